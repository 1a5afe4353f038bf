"""AMCT's accuracy-based automatic calibration (spec 2.3): quantize everything; while the user's metric says the
accuracy is not kept, put the most sensitive layers back to float (a binary search over how many), recalibrating
and scoring each try.

    class Evaluator(amct.AutoCalibrationEvaluatorBase):
        def calibration(self, model): ...            # run batch_num calibration batches through model
        def evaluate(self, model): ...               # -> the metric, e.g. top-1
        def metric_eval(self, original, new): ...    # -> (within the target?, loss)

    amct.accuracy_based_auto_calibration(model, Evaluator(), "tmp/config.json", "tmp/record.txt",
                                         "results/model", input_data)

Outputs as AMCT's: `<save_dir>_deploy_model.onnx` / `_fake_quant_model.onnx`, the record, and beside the models
`accuracy_based_auto_calibration_final_config.json` (the config with the layers put back to float) and
`accuracy_based_auto_calibration_ranking_info.json` (the per-layer sensitivity, most sensitive first), and the
search history `amct_log/accuracy_based_auto_calibration_record.json`. Where even the float model fails
`metric_eval`, a ValueError; where only the float model meets it, no model is left and the log says so.

Where it differs from AMCT: `sensitivity="OutputLoss"` ranks the layers by what quantizing each one alone does to
the network's output (core/sensitivity.py) instead of the cosine similarity of its own output; the user's config
file is left as it was (each try's config is written to a temporary folder); the models evaluated are the
calibrated simulations, which the fake-quant ONNX model reproduces bit for bit.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile

from ..core import log
from ..core.api import quant_layers
from ..core.capture import capture
from ..core.fileio import write_text
from ..core.reconstruction import float_parameters
from ..core.sensitivity import SampleRecorder, cosine_similarity, layer_cosine, layer_output_loss
from . import amct_log
from .calibration import quantize_model, save_model
from .config_files import load_json, save_json

RANKING_FILE = "accuracy_based_auto_calibration_ranking_info.json"
FINAL_CONFIG_FILE = "accuracy_based_auto_calibration_final_config.json"
HISTORY_FILE = "accuracy_based_auto_calibration_record.json"


class AutoCalibrationEvaluatorBase:
    """The user's side of the search (AMCT's class of this name): subclass it and implement all three."""

    def calibration(self, model):
        """Run the calibration batches (at least the config's batch_num) through `model`."""
        raise NotImplementedError

    def evaluate(self, model):
        """The metric of `model` (the float model, then calibrated simulations), e.g. top-1 accuracy."""
        raise NotImplementedError

    def metric_eval(self, original_metric, new_metric) -> tuple[bool, float]:
        """(whether `new_metric` is within the target of `original_metric`, the loss between them)."""
        raise NotImplementedError


class SensitivityBase:
    """How a layer's quantized output compares with its float output (AMCT's class of this name): `compare` gets
    both as numpy arrays and returns a similarity; the layers of lowest similarity go back to float first."""

    def compare(self, data, other) -> float:
        raise NotImplementedError


class CosineSimilaritySensitivity(SensitivityBase):
    """AMCT's default: 0.5 + 0.5 * cosine similarity."""

    def compare(self, data, other) -> float:
        import torch
        return cosine_similarity(torch.as_tensor(data), torch.as_tensor(other))


class OutputLossSensitivity(SensitivityBase):
    """openamct's: the network's output with only the layer quantized against the float model's (KL of the softmax
    for a classifier, else relative squared error; core/sensitivity.layer_output_loss). Its ranking values are the
    negated losses, so that lower still means more sensitive."""


class AutoCalibrationStrategyBase:
    """Which layers to quantize next (AMCT's class of this name). `initialize(ranking_info)` gets {layer:
    sensitivity, lower = more sensitive}; `update_quant_config(metric_eval)` gets the last try's (ok, loss) and
    returns {"roll_back_config": {layer: quantize it?}, "stop_flag": bool}."""

    def initialize(self, ranking_info: dict):
        raise NotImplementedError

    def update_quant_config(self, metric_eval):
        raise NotImplementedError


class BinarySearchStrategy(AutoCalibrationStrategyBase):
    """AMCT's default: binary search for the fewest most-sensitive layers to put back to float. The first call
    gets the all-quantized result (not ok); the search then stops at the smallest count found to be ok."""

    def initialize(self, ranking_info: dict):
        self.order = sorted(ranking_info, key=lambda name: ranking_info[name])
        self.low, self.high = 0, len(self.order)  # low: known not ok; high: ok (all float) until shown otherwise
        self.tried = None

    def _config(self, count: int) -> dict:
        back = set(self.order[:count])
        return {name: name not in back for name in self.order}

    def update_quant_config(self, metric_eval):
        ok = bool(metric_eval[0])
        if self.tried is not None:
            if ok:
                self.high = self.tried
            else:
                self.low = self.tried
        if self.high - self.low <= 1:
            return {"roll_back_config": self._config(self.high), "stop_flag": True}
        self.tried = (self.low + self.high) // 2
        return {"roll_back_config": self._config(self.tried), "stop_flag": False}


def _strategy(strategy):
    if strategy == "BinarySearch":
        return BinarySearchStrategy()
    if not isinstance(strategy, AutoCalibrationStrategyBase):
        raise TypeError("strategy: expected 'BinarySearch' or an instance of AutoCalibrationStrategyBase, got "
                        f"{strategy!r}")
    return strategy


def _sensitivity(sensitivity):
    named = {"CosineSimilarity": CosineSimilaritySensitivity, "OutputLoss": OutputLossSensitivity}
    if isinstance(sensitivity, str) and sensitivity in named:
        return named[sensitivity]()
    if not isinstance(sensitivity, SensitivityBase):
        raise TypeError(f"sensitivity: expected {' or '.join(map(repr, named))} or an instance of SensitivityBase, "
                        f"got {sensitivity!r}")
    return sensitivity


def _ranking(sensitivity, qmodel, floats, samples) -> dict:
    if isinstance(sensitivity, OutputLossSensitivity):
        return {name: -loss for name, loss in layer_output_loss(qmodel, floats, samples).items()}
    if isinstance(sensitivity, CosineSimilaritySensitivity):
        return layer_cosine(qmodel, floats, samples)
    compare = lambda data, other: sensitivity.compare(data.cpu().numpy(), other.cpu().numpy())
    return layer_cosine(qmodel, floats, samples, compare)


def accuracy_based_auto_calibration(model, model_evaluator, config_file, record_file, save_dir, input_data,
                                    input_names=None, output_names=None, dynamic_axes=None, strategy="BinarySearch",
                                    sensitivity="CosineSimilarity"):
    """Quantize `model` as `config_file` (create_quant_config's) says, putting layers back to float until
    `model_evaluator.metric_eval` is satisfied; see the module docstring. Returns None, as AMCT's."""
    amct_log.install()
    if not isinstance(model_evaluator, AutoCalibrationEvaluatorBase):
        raise TypeError("model_evaluator: expected an instance of AutoCalibrationEvaluatorBase")
    strategy, sensitivity = _strategy(strategy), _sensitivity(sensitivity)
    config = load_json(config_file, known_layers=capture(model, input_data).layers)
    io = dict(input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes)
    directory = os.path.dirname(os.path.realpath(save_dir))
    os.makedirs(directory, exist_ok=True)
    temp = tempfile.mkdtemp(prefix="auto_calibration_", dir=directory)
    history = []
    try:
        original = model_evaluator.evaluate(model)
        log.info(f"Accuracy of original model is {original}", "AutoCalibration")
        if not model_evaluator.metric_eval(original, original)[0]:
            raise ValueError("metric_eval(original, original) is not satisfied: not even the float model meets the "
                             "target; check metric_eval()")
        quantized = config.enabled()

        def calibrated(keep: dict, samples=None):
            """Calibrate and save the model with the layers `keep` says to quantize; its metric and floats."""
            step_file = os.path.join(temp, "config.json")
            save_json(_quantizing(config, keep), step_file)
            qmodel = quantize_model(step_file, os.path.join(temp, "modified_model.onnx"), record_file, model,
                                    input_data, **io)
            floats = float_parameters(quant_layers(qmodel))
            handle = qmodel.register_forward_pre_hook(samples) if samples is not None else None
            model_evaluator.calibration(qmodel)
            if handle is not None:
                handle.remove()
            save_model(os.path.join(temp, "modified_model.onnx"), record_file, save_dir)
            metric = model_evaluator.evaluate(qmodel)
            history.append({"roll_back_config": dict(keep), "metric_eval": list(model_evaluator.metric_eval(
                original, metric))})
            return qmodel, floats, metric

        samples = SampleRecorder()
        everything = dict.fromkeys(quantized, True)
        qmodel, floats, global_metric = calibrated(everything, samples)
        log.info(f"Accuracy of global quantized model is {global_metric}", "AutoCalibration")
        ranking = _ranking(sensitivity, qmodel, floats, samples.batches)
        del qmodel
        final, saved_metric = everything, global_metric
        if not model_evaluator.metric_eval(original, global_metric)[0]:
            final, saved_metric = _search(strategy, ranking, model_evaluator, original, global_metric, calibrated)
        _write_outputs(directory, ranking, history, config, final)
        if final is None:
            for kind in ("deploy", "fake_quant"):
                path = f"{save_dir}_{kind}_model.onnx" if os.path.basename(save_dir) else \
                    os.path.join(save_dir, f"{kind}_model.onnx")
                if os.path.exists(path):
                    os.remove(path)
            log.warning("No quantized model is generated: every quantized layer had to go back to float to meet "
                        "the target, which may be too strict.", "AutoCalibration")
            return None
        log.info(f"Accuracy of saved model is {saved_metric}", "AutoCalibration")
        log.info(f"The generated model is stored in dir: {directory}", "AutoCalibration")
        log.info(f"The records file is stored in dir: {os.path.dirname(os.path.realpath(record_file))}",
                 "AutoCalibration")
        return None
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _search(strategy, ranking, evaluator, original, global_metric, calibrated):
    """Run the strategy until it stops; the final {layer: quantize?} (None: every layer back to float) and the
    saved model's metric. The saved files are always the final configuration's."""
    strategy.initialize(dict(ranking))
    result = strategy.update_quant_config(evaluator.metric_eval(original, global_metric))
    last, metric, step = None, None, 0
    while True:
        keep = dict(result["roll_back_config"])
        if result["stop_flag"] and keep == last:
            break
        if not any(keep.values()):
            return None, original
        step += 1
        _, _, metric = calibrated(keep)
        ok, loss = evaluator.metric_eval(original, metric)
        back = sorted(name for name, quantize in keep.items() if not quantize)
        log.info(f"Fine search step {step}: {len(back)} layers in float ({', '.join(back[:10])}"
                 f"{', ...' if len(back) > 10 else ''}): metric {metric}, metric_eval ({ok}, {loss})",
                 "AutoCalibration")
        last = keep
        if result["stop_flag"]:
            break
        result = strategy.update_quant_config((ok, loss))
    return last, metric


def _quantizing(config, keep: dict):
    """`config` with the layers of `keep` quantized or not as it says (AMCT's roll_back_config)."""
    layers = {name: dataclasses.replace(layer, quant_enable=keep.get(name, layer.quant_enable))
              for name, layer in config.layers.items()}
    return dataclasses.replace(config, layers=layers)


def _write_outputs(directory, ranking, history, config, final) -> None:
    """AMCT's three files: the ranking ([layer, value] pairs, most sensitive first) and the final config beside the
    models, the history under amct_log/."""
    ordered = sorted(ranking.items(), key=lambda item: item[1])
    write_text(os.path.join(directory, RANKING_FILE), json.dumps([[name, value] for name, value in ordered],
                                                                   indent=4) + "\n")
    write_text(os.path.join(os.path.dirname(amct_log.log_path()), HISTORY_FILE),
               json.dumps(history, indent=4) + "\n")
    if final is not None:
        save_json(_quantizing(config, final), os.path.join(directory, FINAL_CONFIG_FILE))
