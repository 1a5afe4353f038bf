"""openamct: AMCT-compatible model compression for PyTorch on any CPU or CUDA GPU.

`import openamct as amct` gives AMCT's calls (create_quant_config, quantize_model, save_model; the QAT calls
create_quant_retrain_config, create_quant_retrain_model, restore_quant_retrain_model, save_quant_retrain_model);
the native API (quantize, prepare, calibrate, convert, export; openamct.retrain) sits underneath.
"""
from .amct import (create_quant_config, create_quant_retrain_config, create_quant_retrain_model, quantize_model,
                   restore_quant_retrain_model, save_model, save_quant_retrain_model)
from .api import calibrate, convert, default_config, export, prepare, quantize
from .config import ActQuantParams, ConfigError, LayerConfig, QuantConfig, WeightQuantParams

__all__ = ["create_quant_config", "quantize_model", "save_model", "create_quant_retrain_config",
           "create_quant_retrain_model", "restore_quant_retrain_model", "save_quant_retrain_model", "quantize", "prepare", "calibrate", "convert",
           "export", "default_config", "QuantConfig", "LayerConfig", "ActQuantParams", "WeightQuantParams",
           "ConfigError"]
__version__ = "0.1.0"
