"""Q/DQ placement for speed (issue 20 items 2 and 3): a quantized layer's output is quantized wherever something
other than a quantized layer reads it, after the ReLU/clip ONNX Runtime fuses into the integer kernel, so every
conv runs as QLinearConv; a layer whose INT8 kernel ORT runs slower than float is deployed float, and says so."""
import dataclasses
import logging
import sys
from collections import Counter
from pathlib import Path

import onnx
import pytest
import torch
import torch.nn.functional as F
from test_export import optimized_ops
from torch import nn

import openamct
from openamct.core.api import quant_layers
from openamct.onnx_export import fallback

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from zoo_models import ZOO


@pytest.fixture
def log_lines():
    """(level, message) of each record openamct's logger emits meanwhile, at INFO and above, whatever handlers and
    propagation earlier tests (the AMCT flow's log) left on it."""
    lines = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append((record.levelname, record.getMessage()))
    logger = logging.getLogger("openamct")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def calibrated(model, batches):
    config = openamct.default_config(model, batches[0])
    return openamct.quantize(model, config, lambda q: [q(*b) if isinstance(b, tuple) else q(b) for b in batches],
                             batches[0])


class Heads(nn.Module):
    """conv -> ReLU -> max pool; conv -> hardswish; conv -> ReLU -> conv; conv -> ReLU6 -> mean -> Linear."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.d, self.e, self.fc = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 16, 1), nn.Linear(16, 4)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.a(x)), 2)
        x = self.d(F.relu(self.c(F.hardswish(self.b(x)))))
        return self.fc(F.relu6(self.e(x)).mean((2, 3)))


def test_output_quantized_where_a_non_quantized_op_reads_it(tmp_path):
    torch.manual_seed(0)
    model = Heads().eval()
    qmodel = calibrated(model, [torch.randn(4, 3, 16, 16) for _ in range(2)])
    layers = quant_layers(qmodel)
    bounds = {name: layer.output_quantizer.bounds if layer.output_quantizer is not None else None
              for name, layer in layers.items()}
    inf = float("inf")
    # a: after its ReLU (max pool reads it); b: its own output (hardswish); c: read by d only; d: hardswish-free
    # output read by e? no: d's output is e's input; e: after ReLU6 (the mean); fc: the model's output
    assert bounds == {"a": (0.0, inf), "b": (-inf, inf), "c": None, "d": None, "e": (0.0, 6.0), "fc": None}
    report = openamct.export(qmodel, str(tmp_path / "heads"), torch.randn(8, 3, 16, 16), float_fallback="never")
    assert all(result["ok"] for result in report["parity"].values()), report["parity"]
    assert report["parity"]["fake_quant"]["max_abs_diff"] == 0
    ops = Counter(optimized_ops(report["paths"]["deploy"], tmp_path))
    assert ops["QLinearConv"] == 5 and not {"Conv", "FusedConv"} & set(ops), ops


def test_a_layer_kept_float_reads_its_input_unquantized():
    """AMCT's fallback: where the config keeps a layer float, the output feeding only it is not quantized."""
    torch.manual_seed(0)
    model = Heads().eval()
    batches = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    config = openamct.default_config(model, batches[0], skip_layers=["d"])
    layers = quant_layers(openamct.quantize(model, config, lambda q: [q(b) for b in batches], batches[0]))
    assert "d" not in layers and layers["c"].output_quantizer is None
    assert layers["b"].output_quantizer is not None  # hardswish still reads b: quantized as before


def test_tiny_mobilenet_v3_every_conv_runs_on_integers(tmp_path):
    """Hardswish and the squeeze-excite's hardsigmoid * mul no longer leave the convs before them float."""
    torch.manual_seed(1)
    zoo = ZOO["mobilenet_v3"]
    model = zoo.build("tiny")
    qmodel = calibrated(model, [zoo.example(4, "tiny") for _ in range(2)])
    report = openamct.export(qmodel, str(tmp_path / "mnv3"), zoo.example(8, "tiny"), float_fallback="never")
    assert all(result["ok"] for result in report["parity"].values()), report["parity"]
    assert report["parity"]["fake_quant"]["max_abs_diff"] == 0
    ops = Counter(optimized_ops(report["paths"]["deploy"], tmp_path))
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert ops["QLinearConv"] == convs and ops["QGemm"] == 1 and not {"Conv", "FusedConv", "Gemm"} & set(ops), ops


class Tokens(nn.Module):
    """A bias-free Linear on [batch, tokens, features] plus a positional embedding (a constant Add that is not its
    bias), GELU, and a Linear with a bias; the embedding's sum also reaches the output unquantized."""

    def __init__(self):
        super().__init__()
        self.embed, self.out = nn.Linear(8, 16, bias=False), nn.Linear(16, 4)
        self.pos = nn.Parameter(torch.randn(1, 5, 16))

    def forward(self, x):
        y = self.embed(x) + self.pos
        return self.out(F.gelu(y)) + y[..., :4]  # y also straight to the output: any difference in it shows


def test_the_bias_of_a_linear_on_more_than_two_dims_is_added_as_the_simulation_adds_it(tmp_path):
    """The exporter writes such a Linear's bias as an Add after its MatMul: the exported models add the bias as the
    simulation does (its INT32 codes on the accumulator's grid), and a constant added after a bias-free Linear
    (a positional embedding) stays where it is: the fake-quant model is bit-exact either way."""
    torch.manual_seed(0)
    batches = [torch.randn(4, 5, 8) for _ in range(2)]
    model = Tokens().eval()
    config = openamct.default_config(model, batches[0])
    layers = {name: dataclasses.replace(layer, weight=dataclasses.replace(layer.weight, bias_correction=False))
              for name, layer in config.layers.items()}  # else bias correction gives the embedding Linear a bias
    qmodel = openamct.quantize(model, dataclasses.replace(config, layers=layers), lambda q: [q(b) for b in batches],
                               batches[0])
    assert quant_layers(qmodel)["embed"].layer.bias is None
    assert all(layer.output_quantizer is None for layer in quant_layers(qmodel).values())
    report = openamct.export(qmodel, str(tmp_path / "tokens"), batches[0], float_fallback="never")
    assert report["parity"]["fake_quant"]["max_abs_diff"] == 0, report["parity"]
    assert report["parity"]["deploy"]["ok"], report["parity"]


def test_layer_slower_on_int8_is_deployed_float_and_reported(tmp_path, monkeypatch):
    """A layer ORT runs slower on INT8 than in float (here the 3x3x3 Conv3d, its timing made deterministic) is
    deployed float, the report says why, the simulation computes as deployed; the timing is cached, and
    float_fallback="never" keeps every layer on integers."""
    timed = []

    def timer(models, shape, threads, model_input):
        timed.append(shape)
        return {"int8": 2.0, "float": 1.0} if len(shape) == 5 else {"int8": 1.0, "float": 2.0}

    monkeypatch.setattr(fallback, "_time", timer)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(4, 8, 3, padding=1), nn.ReLU(), nn.Flatten(2), nn.Conv1d(8, 8, 3)).eval()
    x = torch.randn(2, 4, 4, 8, 8)
    qmodel = calibrated(model, [x])
    report = openamct.export(qmodel, str(tmp_path / "video"), x)
    assert report["float_layers"] == {"0": "ONNX Runtime runs its INT8 kernel slower than float on input "
                                           "[2, 4, 4, 8, 8]: 2 ms against 1 ms; the deploy model runs 1 ms so, "
                                           "against 2 ms"}
    assert all(result["ok"] for result in report["parity"].values()), report["parity"]
    assert [name for name, layer in quant_layers(qmodel).items() if layer.deploy_float] == ["0"]
    # it reads the model input as it is and leaves its output unquantized: one QuantizeLinear, the next layer's
    assert quant_layers(qmodel)["0"].float_input
    deploy = onnx.load(report["paths"]["deploy"])
    assert [n.op_type for n in deploy.graph.node if deploy.graph.input[0].name in n.input] == ["Conv"]
    assert [n.name for n in deploy.graph.node if n.op_type == "QuantizeLinear"] == ["3.quant"]
    ops = optimized_ops(report["paths"]["deploy"], tmp_path)
    assert "QLinearConv" not in ops and ops.count("Conv") + ops.count("FusedConv") == 2, ops
    again = openamct.export(qmodel, str(tmp_path / "again"), x)
    assert again["float_layers"] == report["float_layers"] and len(timed) == 3  # confirmed once; then cached
    forced = openamct.export(qmodel, str(tmp_path / "forced"), x, float_fallback="never")
    assert forced["float_layers"] == {} and not any(layer.deploy_float for layer in quant_layers(qmodel).values())
    assert optimized_ops(forced["paths"]["deploy"], tmp_path).count("QLinearConv") == 1  # the last: float output


def test_layers_slower_alone_stay_on_integers_where_the_whole_model_is_faster_so(tmp_path, monkeypatch, log_lines):
    """Every layer is timed slower on INT8 alone, but the whole deploy model runs faster with each on integers:
    they are tried in turn on the whole model until PATIENCE in a row were no faster float, the rest not tried;
    all stay on integers, and the coverage log says why."""
    monkeypatch.setattr(fallback, "_time", lambda models, shape, threads, model_input: {"int8": 2.0, "float": 1.0})
    timed = []

    def whole(models, sample):
        timed.append((list(models), [a.shape for a in sample]))
        return {name: {"with": 2.0, "without": 1.0, "deploy": 1.0, "float": 3.0}[name] for name in models}

    monkeypatch.setattr(fallback, "whole_model_times", whole)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    layers = [nn.Conv2d(3, 8, 3, padding=1)] + [nn.Conv2d(8, 8, 3, padding=1) for _ in range(fallback.PATIENCE + 1)]
    qmodel = calibrated(nn.Sequential(*[m for conv in layers for m in (conv, nn.ReLU())][:-1]).eval(), [x])
    names = [str(2 * i) for i in range(len(layers))]
    report = openamct.export(qmodel, str(tmp_path / "model"), x)
    # PATIENCE layers tried on the whole model, then the deploy model timed with the float one
    assert report["float_layers"] == {}
    assert timed == [(["with", "without"], [(2, 3, 8, 8)])] * fallback.PATIENCE + [(["deploy", "float"],
                                                                                     [(2, 3, 8, 8)])]
    assert report["speed"] == {"deploy_ms": 1.0, "float_ms": 3.0}
    assert not any(layer.deploy_float for layer in quant_layers(qmodel).values())
    messages = [message for _, message in log_lines]
    for name in names[:fallback.PATIENCE]:
        assert any(f"{name}: kept on integers: its INT8 kernel is the slower alone, but the deploy model runs 1 ms"
                   in message for message in messages), messages
    for name in names[fallback.PATIENCE:]:
        assert any(f"{name}: kept on integers, not tried on the whole deploy model" in message
                   for message in messages), messages
    assert optimized_ops(report["paths"]["deploy"], tmp_path).count("QLinearConv") >= 1


def test_a_deploy_model_slower_than_float_is_reported(tmp_path, monkeypatch, log_lines):
    """The export times the deploy model against the float model it was built from: where the deploy model is the
    slower, a warning says so with both times, and the report carries them."""
    monkeypatch.setattr(fallback, "whole_model_times", lambda models, sample: {"deploy": 3.0, "float": 2.0})
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    qmodel = calibrated(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Hardswish(), nn.Conv2d(8, 4, 3)).eval(), [x])
    report = openamct.export(qmodel, str(tmp_path / "model"), x)
    assert report["speed"] == {"deploy_ms": 3.0, "float_ms": 2.0}
    warnings = [message for level, message in log_lines if level == "WARNING"]
    assert any("runs 3 ms against the float model's 2 ms" in w and "slower than float" in w for w in warnings), \
        warnings
    monkeypatch.setattr(fallback, "whole_model_times", lambda models, sample: {"deploy": 1.0, "float": 2.0})
    log_lines.clear()
    assert openamct.export(qmodel, str(tmp_path / "again"), x)["speed"] == {"deploy_ms": 1.0, "float_ms": 2.0}
    assert not [message for level, message in log_lines if level == "WARNING"]


@pytest.mark.real_kernel_timing
def test_kernel_timing_runs_both_forms(tmp_path):
    """The real timer: both forms of a layer run in ORT and take a positive time; the deploy and float models run
    in it too."""
    torch.manual_seed(0)
    qmodel = calibrated(nn.Sequential(nn.Conv2d(3, 8, 3)).eval(), [torch.randn(2, 3, 8, 8)])
    report = openamct.export(qmodel, str(tmp_path / "one"), torch.randn(2, 3, 8, 8), check=False)
    times = list(fallback._read_cache().values())
    assert len(times) == 1 and set(times[0]) == {"int8", "float"} and min(times[0].values()) > 0
    assert set(report["speed"]) == {"deploy_ms", "float_ms"} and min(report["speed"].values()) > 0


def test_float_layers_forces_a_layer_float(tmp_path):
    torch.manual_seed(0)
    qmodel = calibrated(Heads().eval(), [torch.randn(4, 3, 16, 16)])
    report = openamct.export(qmodel, str(tmp_path / "heads"), torch.randn(4, 3, 16, 16), float_fallback="never",
                             float_layers=["c"])
    assert report["float_layers"] == {"c": "float_layers names it"}
    assert all(result["ok"] for result in report["parity"].values()), report["parity"]
    assert Counter(optimized_ops(report["paths"]["deploy"], tmp_path))["QLinearConv"] == 4
    with pytest.raises(ValueError, match="float_fallback"):
        openamct.export(qmodel, str(tmp_path / "bad"), torch.randn(4, 3, 16, 16), float_fallback="auto")


def test_per_layer_error_compares_a_clipped_output_with_the_clipped_float_one():
    """A layer quantized after its ReLU6 outputs the clipped value: its SQNR and cosine compare like with like."""
    from openamct.app.report import layer_errors
    from openamct.core.reconstruction import float_parameters
    from openamct.core.sensitivity import layer_cosine

    torch.manual_seed(0)
    model = Heads().eval()
    batches = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    qmodel = openamct.prepare(model, openamct.default_config(model, batches[0]), batches[0])
    floats = float_parameters(quant_layers(qmodel))
    qmodel = openamct.calibrate(qmodel, lambda q: [q(b) for b in batches])
    assert quant_layers(qmodel)["e"].output_quantizer.bounds == (0.0, 6.0)
    for errors in (layer_errors(model, qmodel, batches[0]), layer_errors(None, qmodel, batches[0], isolated=True)):
        assert errors["e"] > 25, errors
    assert layer_cosine(qmodel, floats, batches)["e"] > 0.999
