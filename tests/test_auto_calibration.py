"""Accuracy-driven quantization: per-layer sensitivity, AMCT's accuracy_based_auto_calibration, mixed precision."""
import json
import math

import pytest
import torch
from tiny_models import fragilenet

import openamct as amct
from openamct.amct.config_files import load_json
from openamct.core.api import calibrate, prepare, quant_layers
from openamct.core.config import ConfigError
from openamct.core.mixed_precision import option_bytes, tradeoff_path
from openamct.core.reconstruction import float_parameters
from openamct.core.sensitivity import layer_cosine, layer_output_loss, output_loss

CALIBRATION = [torch.randn(64, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
TEST = torch.randn(512, 16, generator=torch.Generator().manual_seed(99))


def agreement(model, reference) -> float:
    """Top-1 agreement (%) with the float model on TEST: the metric the searches keep."""
    with torch.no_grad():
        return 100 * (model(TEST).argmax(1) == reference(TEST).argmax(1)).float().mean().item()


class Evaluator(amct.AutoCalibrationEvaluatorBase):
    def __init__(self, reference, allowed=1.0):
        self.reference, self.allowed, self.evaluated = reference, allowed, 0

    def calibration(self, model):
        with torch.no_grad():
            for batch in CALIBRATION:
                model(batch)

    def evaluate(self, model):
        self.evaluated += 1
        return agreement(model, self.reference)

    def metric_eval(self, original, new):
        return original - new <= self.allowed, original - new


def calibrated(model):
    config = amct.default_config(model, model.example_input(4), batch_num=2)
    qmodel = prepare(model, config, model.example_input(4))
    floats = float_parameters(quant_layers(qmodel))
    return calibrate(qmodel, lambda m: [m(b) for b in CALIBRATION]), floats


def test_the_outlier_layer_ranks_first_under_both_sensitivities():
    qmodel, floats = calibrated(fragilenet())
    cosine = layer_cosine(qmodel, floats, [CALIBRATION[0]])
    alone = layer_output_loss(qmodel, floats, [CALIBRATION[0]])
    assert min(cosine, key=cosine.get) == "fc3"
    assert max(alone, key=alone.get) == "fc3"
    others = [alone[name] for name in alone if name != "fc3"]
    assert alone["fc3"] > 20 * max(others)  # not a near tie: the outlier input costs far more than the rest
    assert all(0 <= value <= 1 for value in cosine.values())


def test_output_loss_is_kl_for_logits_and_relative_error_otherwise():
    logits = torch.randn(8, 10)
    assert output_loss(logits, logits) == pytest.approx(0, abs=1e-12)
    assert output_loss(logits, logits + 3.0) == pytest.approx(0, abs=1e-9)  # softmax ignores a constant shift
    assert output_loss(logits, 2 * logits) > 0.01
    maps = torch.randn(2, 3, 4, 4)
    assert output_loss(maps, 1.1 * maps) == pytest.approx(0.01, rel=1e-6)


@pytest.mark.parametrize("sensitivity", ["CosineSimilarity", "OutputLoss"])
def test_auto_calibration_puts_back_the_fragile_layer_only(tmp_path, monkeypatch, sensitivity):
    monkeypatch.chdir(tmp_path)
    model = fragilenet()
    x = model.example_input(4)
    amct.create_quant_config("tmp/config.json", model, x, batch_num=2)
    evaluator = Evaluator(model)
    amct.accuracy_based_auto_calibration(model, evaluator, "tmp/config.json", "tmp/record.txt", "results/net", x,
                                         sensitivity=sensitivity)
    final = load_json(str(tmp_path / "results" / "accuracy_based_auto_calibration_final_config.json"))
    assert [name for name, layer in final.layers.items() if not layer.quant_enable] == ["fc3"]
    ranking = json.loads((tmp_path / "results" / "accuracy_based_auto_calibration_ranking_info.json").read_text())
    assert ranking[0][0] == "fc3" and sorted(name for name, _ in ranking) == ["fc1", "fc2", "fc3", "fc4"]
    history = json.loads((tmp_path / "amct_log" / "accuracy_based_auto_calibration_record.json").read_text())
    assert history[0]["metric_eval"][0] is False  # everything quantized misses the target
    assert history[-1]["roll_back_config"] == {"fc1": True, "fc2": True, "fc3": False, "fc4": True}
    for kind in ("deploy", "fake_quant"):
        assert (tmp_path / "results" / f"net_{kind}_model.onnx").stat().st_size > 0
    log = (tmp_path / "amct_log" / "amct_pytorch.log").read_text()
    for line in ("Accuracy of original model is 100.0", "Accuracy of global quantized model is",
                 "Accuracy of saved model is"):
        assert line in log
    assert json.loads((tmp_path / "tmp" / "config.json").read_text())["fc3"]["quant_enable"]  # the user's file


def test_a_custom_strategy_and_sensitivity_are_used(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    class EveryOther(amct.AutoCalibrationStrategyBase):
        """Puts back every layer the ranking lists at an even position, in one step."""

        def initialize(self, ranking_info):
            self.ranking = dict(ranking_info)

        def update_quant_config(self, metric_eval):
            order = sorted(self.ranking, key=self.ranking.get)
            return {"roll_back_config": {name: i % 2 == 1 for i, name in enumerate(order)}, "stop_flag": True}

    class Negated(amct.SensitivityBase):
        calls = 0

        def compare(self, data, other):
            Negated.calls += 1
            return -float(abs(data - other).max())  # largest error first

    model = fragilenet()
    x = model.example_input(4)
    amct.create_quant_config("tmp/config.json", model, x, batch_num=2)
    strategy = EveryOther()
    amct.accuracy_based_auto_calibration(model, Evaluator(model), "tmp/config.json",
                                         "tmp/record.txt", "results/net", x, strategy=strategy,
                                         sensitivity=Negated())
    assert Negated.calls >= 4 and set(strategy.ranking) == {"fc1", "fc2", "fc3", "fc4"}
    order = sorted(strategy.ranking, key=strategy.ranking.get)
    final = load_json(str(tmp_path / "results" / "accuracy_based_auto_calibration_final_config.json"))
    assert {name for name, layer in final.layers.items() if not layer.quant_enable} == set(order[::2])


def test_no_model_where_only_float_meets_the_target(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = fragilenet()
    x = model.example_input(4)
    amct.create_quant_config("tmp/config.json", model, x, batch_num=2)

    class Exact(Evaluator):
        def evaluate(self, model):
            with torch.no_grad():
                return float(-(model(TEST) - self.reference(TEST)).abs().max())

        def metric_eval(self, original, new):
            return new >= original, original - new

    amct.accuracy_based_auto_calibration(model, Exact(model), "tmp/config.json", "tmp/record.txt", "results/net", x)
    assert not list((tmp_path / "results").glob("*_model.onnx"))
    assert not (tmp_path / "results" / "accuracy_based_auto_calibration_final_config.json").exists()
    assert "No quantized model is generated" in (tmp_path / "amct_log" / "amct_pytorch.log").read_text()

    class Broken(Evaluator):
        def metric_eval(self, original, new):
            return False, 0.0

    with pytest.raises(ValueError, match="not even the float model"):
        amct.accuracy_based_auto_calibration(model, Broken(model), "tmp/config.json", "tmp/record.txt",
                                             "results/net", x)


def test_tradeoff_path_runs_from_all_largest_to_all_smallest():
    sizes = {"a": {"float": 400.0, "8": 100.0, "4": 50.0}, "b": {"float": 40.0, "8": 10.0, "4": 5.0}}
    losses = {"a": {"float": 0.0, "8": 0.01, "4": 0.02}, "b": {"float": 0.0, "8": 0.5, "4": 0.6}}
    path = tradeoff_path(losses, sizes)
    assert path[0] == {"a": "float", "b": "float"} and path[-1] == {"a": "4", "b": "4"}
    total = [sum(sizes[n][o] for n, o in choice.items()) for choice in path]
    predicted = [sum(losses[n][o] for n, o in choice.items()) for choice in path]
    assert total == sorted(total, reverse=True) and predicted == sorted(predicted)
    assert path[1] == {"a": "8", "b": "float"}  # the cheapest loss per byte saved goes first
    # a format both larger and worse than another is never chosen
    losses["b"]["8"] = 0.7
    assert all(choice["b"] != "8" for choice in tradeoff_path(losses, sizes))


def test_weight_bytes_of_the_formats():
    assert option_bytes("8", (10, 64)) == 640 and option_bytes("4", (10, 64)) == 320
    assert option_bytes("float", (10, 64)) == 2560
    assert option_bytes("nuq16", (1000, 256), codebook="layer") == 1000 * 256 / 2 + 16


def test_mixed_precision_keeps_the_fragile_layer_and_shrinks_the_rest():
    model = fragilenet()
    evaluations = []

    def evaluate(m):
        evaluations.append(m)
        return agreement(m, model)

    result = amct.mixed_precision(model, model.example_input(4), lambda m: [m(b) for b in CALIBRATION], evaluate,
                                  max_drop=1.0, options=("4", "8"),
                                  base_config=amct.default_config(model, model.example_input(4), batch_num=2))
    assert result.choice["fc3"] == "float"
    assert {result.choice[name] for name in ("fc1", "fc2", "fc4")} <= {"4", "8"}
    assert result.original_metric - agreement(result.qmodel, model) <= 1.0
    assert len(evaluations) == len(result.trials) < 10  # a binary search, not a sweep
    uniform = {t.label: t for t in result.trials}
    assert uniform["uniform 8"].drop > 5 and uniform["uniform 4"].size == pytest.approx(0.5)
    assert all(math.isfinite(t.metric) for t in result.trials)


def test_mixed_precision_under_a_size_budget_and_its_bad_arguments():
    model = fragilenet()
    x = model.example_input(4)
    run = lambda **kw: amct.mixed_precision(model, x, lambda m: [m(b) for b in CALIBRATION],
                                            lambda m: agreement(m, model), **kw)
    result = run(size_budget=0.8, options=("4", "8"))
    assert result.trials[-1].size <= 0.8 and result.qmodel is not None
    with pytest.raises(ConfigError, match="exactly one"):
        run(max_drop=1.0, size_budget=0.8)
    with pytest.raises(ConfigError, match="exactly one"):
        run()
    with pytest.raises(ConfigError, match="'3'"):
        run(max_drop=1.0, options=("3", "8"))
    with pytest.raises(ConfigError, match="smallest configuration"):
        run(size_budget=0.1, options=("8",))


def test_formats_that_do_not_apply_everywhere_leave_those_layers_at_int8():
    model = fragilenet()  # 16..32 inputs per channel: too thin for 16-level codebooks (nuq.size_rule)
    result = amct.mixed_precision(model, model.example_input(4), lambda m: [m(b) for b in CALIBRATION],
                                  lambda m: agreement(m, model), size_budget=1.0, options=("nuq16", "4"))
    assert all(option in ("4", "float") for option in result.choice.values())
    uniform = {t.label: t for t in result.trials}
    assert uniform["uniform nuq16"].size == pytest.approx(1.0)  # no layer takes it: all at INT8
