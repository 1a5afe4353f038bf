"""openamct: AMCT-compatible model compression for PyTorch on any CPU or CUDA GPU.

`import openamct as amct` gives AMCT's calls (create_quant_config, quantize_preprocess, quantize_model,
save_model; the QAT calls create_quant_retrain_config, create_quant_retrain_model, restore_quant_retrain_model,
save_quant_retrain_model; accuracy_based_auto_calibration). The native API sits underneath: default_config (with
Rule), quantize, prepare, calibrate, convert, export, mixed_precision; QAT in openamct.core.qat.

Layout, each floor importing only those before it: core/ (configs, capture, simulation, quantizers, algorithms,
native API) <- onnx_export/ (deploy and fake-quant ONNX, parity, NUQ packing) <- amct/ (AMCT's calls, files and
log format) <- app/ (the CLI, data, models, reports, training loop).
"""
from .amct import (
                   AutoCalibrationEvaluatorBase,
                   AutoCalibrationStrategyBase,
                   BinarySearchStrategy,
                   CosineSimilaritySensitivity,
                   OutputLossSensitivity,
                   SensitivityBase,
                   accuracy_based_auto_calibration,
                   create_quant_config,
                   create_quant_retrain_config,
                   create_quant_retrain_model,
                   quantize_model,
                   quantize_preprocess,
                   restore_quant_retrain_model,
                   save_model,
                   save_quant_retrain_model,
)
from .core.api import calibrate, convert, default_config, prepare, quantize
from .core.config import (
                   ActQuantParams,
                   ConfigError,
                   LayerConfig,
                   QuantConfig,
                   ReconstructionParams,
                   Rule,
                   WeightQuantParams,
                   stem_depthwise_int8,
)
from .core.mixed_precision import mixed_precision
from .onnx_export import export

__all__ = ["create_quant_config", "quantize_preprocess", "quantize_model", "save_model", "create_quant_retrain_config",
           "create_quant_retrain_model", "restore_quant_retrain_model", "save_quant_retrain_model", "quantize",
           "prepare", "calibrate", "convert", "export", "default_config", "Rule", "stem_depthwise_int8",
           "QuantConfig", "LayerConfig", "ActQuantParams", "WeightQuantParams", "ReconstructionParams",
           "ConfigError", "accuracy_based_auto_calibration", "AutoCalibrationEvaluatorBase",
           "AutoCalibrationStrategyBase", "BinarySearchStrategy", "SensitivityBase", "CosineSimilaritySensitivity",
           "OutputLossSensitivity", "mixed_precision"]
__version__ = "0.1.0"
