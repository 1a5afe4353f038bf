"""AMCT-compatible calls: create_quant_config, quantize_model, save_model (PTQ, spec 2.1), the four QAT calls
create_quant_retrain_config, create_quant_retrain_model, restore_quant_retrain_model, save_quant_retrain_model
(spec 2.2), and accuracy_based_auto_calibration (spec 2.3, auto_calibration.py).

`import openamct as amct` runs an AMCT calibration script unchanged. These calls are a thin file-based layer on
the native core: they read and write AMCT's files (config JSON and .cfg, record, fused model) and log in AMCT's
format (amct/amct_log.py); the work is the core's and onnx_export's.
"""
from .auto_calibration import (
    AutoCalibrationEvaluatorBase,
    AutoCalibrationStrategyBase,
    BinarySearchStrategy,
    CosineSimilaritySensitivity,
    OutputLossSensitivity,
    SensitivityBase,
    accuracy_based_auto_calibration,
)
from .calibration import create_quant_config, quantize_model, save_model
from .preprocess import quantize_preprocess
from .retrain import (
    create_quant_retrain_config,
    create_quant_retrain_model,
    restore_quant_retrain_model,
    save_quant_retrain_model,
)

__all__ = ["create_quant_config", "quantize_preprocess", "quantize_model", "save_model", "create_quant_retrain_config",
           "create_quant_retrain_model", "restore_quant_retrain_model", "save_quant_retrain_model",
           "accuracy_based_auto_calibration", "AutoCalibrationEvaluatorBase", "AutoCalibrationStrategyBase",
           "BinarySearchStrategy", "SensitivityBase", "CosineSimilaritySensitivity", "OutputLossSensitivity"]
