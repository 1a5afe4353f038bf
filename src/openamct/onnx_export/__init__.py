"""Export to ONNX: the deploy model (INT8 QDQ, integer kernels in ONNX Runtime) and the fake-quant model (AMCT's
float form, bit-exact with the PyTorch simulation), built in memory from the calibrated model and its records, then
checked against the simulation (parity.py).

    openamct.export(qmodel, "out/model", x)   # out/model_deploy_model.onnx, out/model_fake_quant_model.onnx
"""
import os

import onnx
import torch

from ..core import log
from ..core.api import is_calibrated, quant_layers, records
from ..core.fileio import write_bytes
from . import fallback, parity
from .fused import fused_model
from .packed import write_nuq_weights
from .qdq import build_quantized, float_input_layers

FALLBACKS = ("measure", "never")


def deploy_float(fused, mapping: dict, layer_records: dict, sample, float_fallback: str = "measure",
                 float_layers=()) -> tuple[dict, onnx.ModelProto, dict | None]:
    """(layer -> why the deploy model keeps it float, the deploy model, its speed (_speed)). Kept float:
    `float_layers` (forced by the user) and, with `float_fallback="measure"`, those whose INT8 kernel ONNX Runtime
    runs slower than float (fallback.py) where the whole deploy model is then the faster too (fallback.choose);
    "never": every other quantized layer runs on integers. Logged in the coverage report."""
    if float_fallback not in FALLBACKS:
        raise ValueError(f"float_fallback must be one of {FALLBACKS}, not {float_fallback!r}")
    unknown = sorted(set(float_layers) - set(mapping))
    if unknown:
        raise ValueError(f"float_layers: no quantized layer named {unknown}")
    reasons = {name: "float_layers names it" for name in float_layers}
    arrays = None if sample is None else [t.detach().cpu().numpy() for t in sample if isinstance(t, torch.Tensor)]
    measured = fallback.float_layers(fused, mapping, layer_records, arrays) if float_fallback == "measure" else {}
    measured = {name: why for name, why in measured.items() if name not in reasons}
    if measured and arrays:
        decisions = fallback.choose(lambda names: build_quantized(fused, mapping, layer_records, True,
                                                                  set(reasons) | set(names)),
                                    list(measured), arrays)
        for name, decision in decisions.items():
            if decision is None:
                log.info(f"  {name}: kept on integers, not tried on the whole deploy model: its INT8 kernel is "
                         f"the slower alone, by less than those of the {fallback.PATIENCE} layers tried before it, "
                         f"with which the model was no faster float", "Coverage")
                del measured[name]
                continue
            with_it, without = decision
            if fallback.slower(without, with_it):
                measured[name] += f"; the deploy model runs {with_it:.3g} ms so, against {without:.3g} ms"
            else:
                log.info(f"  {name}: kept on integers: its INT8 kernel is the slower alone, but the deploy model "
                         f"runs {without:.3g} ms with it on integers against {with_it:.3g} ms with it float",
                         "Coverage")
                del measured[name]
    reasons.update(measured)
    for name, why in reasons.items():
        log.info(f"  {name}: deployed in float: {why}", "Coverage")
    deploy = build_quantized(fused, mapping, layer_records, True, reasons)
    times = fallback.whole_model_times({"deploy": deploy, "float": fused}, arrays) if arrays else None
    return reasons, deploy, _speed(times, arrays)


def _speed(times: dict | None, arrays) -> dict | None:
    """{"deploy_ms", "float_ms"}: the deploy model and the float model it was built from, as timed on the export
    sample (None without one); a warning where the deploy model is the slower (fallback.slower), so that a user
    never ships a slower model unawares."""
    if times is None:
        return None
    message = (f"The deploy model runs {times['deploy']:.3g} ms against the float model's {times['float']:.3g} ms "
               f"on the export sample {[list(a.shape) for a in arrays]}")
    if fallback.slower(times["deploy"], times["float"]):
        log.warning(message + ": ONNX Runtime runs it slower than float. The ops between the quantized layers "
                    "(activations such as hardswish, squeeze-excite, normalisations) run in float between a "
                    "DequantizeLinear and a QuantizeLinear; keep the float model for this runtime, or keep "
                    "layers float with float_layers.", "Coverage")
    else:
        log.info(message + ".", "Coverage")
    return {"deploy_ms": times["deploy"], "float_ms": times["float"]}


def write_models(fused, mapping: dict, layer_records: dict, save_path: str, qmodel=None, sample=None, *,
                 float_fallback: str = "measure", float_layers=()) -> dict:
    """Write `<save_path>_deploy_model.onnx`, `<save_path>_fake_quant_model.onnx` (and, with NUQ layers,
    `<save_path>_nuq_weights.npz`) from the fused model and the records; with `qmodel` check their parity with it
    on `sample` (a tuple of model inputs), its layers kept float as deployed. `layer_records` holds every layer of
    `mapping`; `float_fallback`, `float_layers`: see deploy_float. Returns {"paths", "parity", "weight_bytes",
    "float_layers", "speed"} (deploy_float)."""
    floats, deploy, speed = deploy_float(fused, mapping, layer_records, sample, float_fallback, float_layers)
    directory, prefix = os.path.split(save_path)
    stem = f"{prefix}_" if prefix else ""
    paths = {kind: os.path.join(directory or ".", f"{stem}{kind}_model.onnx") for kind in ("deploy", "fake_quant")}
    models = {"deploy": deploy, "fake_quant": build_quantized(fused, mapping, layer_records, False, floats)}
    for kind, path in paths.items():
        write_bytes(path, models[kind].SerializeToString())
        log.info(f"The model file is saved in {os.path.realpath(path)}", "Utils")
    report = {"paths": paths, "parity": None, "float_layers": floats,
              "weight_bytes": write_nuq_weights(fused, mapping, layer_records, directory, stem, paths),
              "speed": speed}
    if qmodel is not None:
        float_read = float_input_layers(fused, mapping, floats)
        for name, layer in quant_layers(qmodel).items():
            layer.deploy_float, layer.float_input = name in floats, name in float_read
        report["parity"] = parity.check(models, mapping, qmodel, sample)
        for kind, result in report["parity"].items():
            message = f"Parity of {parity.describe(kind, result)}"
            (log.info if result["ok"] else log.warning)(message, "Parity")
    return report


def export(qmodel: torch.nn.Module, save_path: str, input_data, *, input_names=None, output_names=None,
           dynamic_axes=None, check: bool = True, float_fallback: str = "measure", float_layers=()) -> dict:
    """Write `<save_path>_deploy_model.onnx` and `<save_path>_fake_quant_model.onnx` of a calibrated model and
    (unless `check` is false) check their parity with it on `input_data`; returns the paths, the parity report,
    the layers deployed float and the deploy and float models' times on `input_data` (`speed`). `float_fallback`:
    "measure" (default) keeps float the layers whose INT8 kernel ONNX Runtime runs slower on `input_data`'s
    shapes, "never" none; `float_layers`: layers deployed float regardless. When checked, the calibrated model
    computes as deployed afterwards."""
    if not is_calibrated(qmodel):
        raise RuntimeError("export: the model is not calibrated; run calibrate()/convert() first")
    fused, mapping = fused_model(qmodel, input_data, input_names, output_names, dynamic_axes)
    sample = input_data if isinstance(input_data, tuple) else (input_data,)
    return write_models(fused, mapping, records(qmodel), save_path, qmodel if check else None, sample,
                        float_fallback=float_fallback, float_layers=float_layers)


__all__ = ["export", "write_models"]
