"""Export to ONNX: the deploy model (INT8 QDQ, integer kernels in ONNX Runtime) and the fake-quant model (AMCT's
float form, bit-exact with the PyTorch simulation), built in memory from the calibrated model and its records, then
checked against the simulation (parity.py).

    openamct.export(qmodel, "out/model", x)   # out/model_deploy_model.onnx, out/model_fake_quant_model.onnx
"""
import os

import torch

from ..core import log
from ..core.api import is_calibrated, records
from ..core.fileio import write_bytes
from . import parity
from .fused import fused_model
from .packed import write_nuq_weights
from .qdq import build_quantized


def write_models(fused, mapping: dict, layer_records: dict, save_path: str, qmodel=None, sample=None) -> dict:
    """Write `<save_path>_deploy_model.onnx`, `<save_path>_fake_quant_model.onnx` (and, with NUQ layers,
    `<save_path>_nuq_weights.npz`) from the fused model and the records; with `qmodel` check their parity with it
    on `sample` (a tuple of model inputs). `layer_records` holds every layer of `mapping`. Returns {"paths",
    "parity", "weight_bytes"}."""
    directory, prefix = os.path.split(save_path)
    stem = f"{prefix}_" if prefix else ""
    paths = {kind: os.path.join(directory or ".", f"{stem}{kind}_model.onnx") for kind in ("deploy", "fake_quant")}
    models = {kind: build_quantized(fused, mapping, layer_records, deploy=kind == "deploy") for kind in paths}
    for kind, path in paths.items():
        write_bytes(path, models[kind].SerializeToString())
        log.info(f"The model file is saved in {os.path.realpath(path)}", "Utils")
    report = {"paths": paths, "parity": None,
              "weight_bytes": write_nuq_weights(fused, mapping, layer_records, directory, stem, paths)}
    if qmodel is not None:
        report["parity"] = parity.check(models, mapping, qmodel, sample)
        for kind, result in report["parity"].items():
            message = f"Parity of {parity.describe(kind, result)}"
            (log.info if result["ok"] else log.warning)(message, "Parity")
    return report


def export(qmodel: torch.nn.Module, save_path: str, input_data, *, input_names=None, output_names=None,
           dynamic_axes=None, check: bool = True) -> dict:
    """Write `<save_path>_deploy_model.onnx` and `<save_path>_fake_quant_model.onnx` of a calibrated model and
    (unless `check` is false) check their parity with it on `input_data`; returns the paths and the parity report."""
    if not is_calibrated(qmodel):
        raise RuntimeError("export: the model is not calibrated; run calibrate()/convert() first")
    fused, mapping = fused_model(qmodel, input_data, input_names, output_names, dynamic_axes)
    sample = input_data if isinstance(input_data, tuple) else (input_data,)
    return write_models(fused, mapping, records(qmodel), save_path, qmodel if check else None, sample)


__all__ = ["export", "write_models"]
