"""AMCT's DMQ balancer: quantize_preprocess, tensor_balance_factor in the record, and what the balancing buys."""
import copy
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

import openamct as amct
from openamct.amct.config_files import config_from_cfg, load_json
from openamct.amct.preprocess import quantize_preprocess
from openamct.amct.record import read_record, write_record
from openamct.core.algorithms import dmq
from openamct.core.api import quant_layers
from openamct.core.config import ConfigError

OUTLIERS = (3, 17, 40)  # input channels that carry values 50 times larger than the rest


class OutlierBlock(nn.Module):
    """A transformer MLP block whose LayerNorms put a few channels 50 times above the rest, as LLM activations
    do (the case SmoothQuant was made for)."""

    def __init__(self, width=64, hidden=128):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.fc1, self.fc2, self.head = nn.Linear(width, hidden), nn.Linear(hidden, width), nn.Linear(width, 32)
        with torch.no_grad():
            for norm in (self.norm1, self.norm2):
                norm.weight[list(OUTLIERS)] = 50.0

    def forward(self, x):
        x = x + self.fc2(nn.functional.gelu(self.fc1(self.norm1(x))))
        return self.head(self.norm2(x))


class OutlierMLP(nn.Module):
    """Linear layers and ReLUs only, fed inputs with outlier channels (`_batches(..., outliers=True)`): no float op
    (LayerNorm, GELU) whose last bits differ between PyTorch and ONNX Runtime stands between the quantizers, so
    a parity failure here is the balancing's."""

    def __init__(self, width=64, hidden=128):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(width, hidden), nn.Linear(hidden, width), nn.Linear(width, 32)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _batches(seed, count, tokens=16, outliers=False):
    generator = torch.Generator().manual_seed(seed)
    batches = [torch.randn(8, tokens, 64, generator=generator) for _ in range(count)]
    for batch in batches if outliers else ():
        batch[..., list(OUTLIERS)] *= 50
    return batches


def _cfg(tmp_path, balancer: str) -> str:
    path = tmp_path / "quant.cfg"
    path.write_text(f"batch_num: 2\ncommon_config {{\n  arq_quantize {{ channel_wise: true }}\n{balancer}}}\n")
    return str(path)


def _flow(tmp_path, model, batches, balancer=""):
    """The AMCT flow, with quantize_preprocess where the cfg balances: the calibrated model and its file paths."""
    example = batches[0]
    tmp_path.mkdir(exist_ok=True)
    config, record, fused = (str(tmp_path / name) for name in ("config.json", "record.txt", "modified.onnx"))
    amct.create_quant_config(config, model, example, config_defination=_cfg(tmp_path, balancer))
    if balancer:
        pre = quantize_preprocess(config, record, model, example)
        with torch.no_grad():
            for batch in batches:
                torch.testing.assert_close(pre(batch), model(batch))  # the pre-pass computes the float model
    qmodel = amct.quantize_model(config, fused, record, model, example)
    with torch.no_grad():
        for batch in batches:
            qmodel(batch)
    return qmodel, config, record, fused


def _error(qmodel, model, inputs) -> float:
    """Mean squared output error relative to the float output's mean square, over held-out inputs."""
    with torch.no_grad():
        reference = torch.cat([model(x) for x in inputs])
        output = torch.cat([qmodel(x) for x in inputs])
    return float((output - reference).pow(2).mean() / reference.pow(2).mean())


def test_balancing_lowers_the_quantized_output_error(tmp_path):
    torch.manual_seed(0)
    model = OutlierBlock().eval()
    calibration, held_out = _batches(1, 2), _batches(2, 4)
    plain, *_ = _flow(tmp_path / "plain", model, calibration)
    balanced, *_ = _flow(tmp_path / "dmq", model, calibration, "  dmq_balancer { migration_strength: 0.5 }\n")
    layers = quant_layers(balanced)
    assert set(layers) == {"fc1", "fc2", "head"} and all(layer.balance is not None for layer in layers.values())
    factors = layers["fc1"].balance
    assert factors[list(OUTLIERS)].min() > 3 * factors.median()  # the outlier channels get the large factors
    error_plain, error_balanced = _error(plain, model, held_out), _error(balanced, model, held_out)
    print(f"relative output MSE: plain {error_plain:.3e}, DMQ {error_balanced:.3e}")
    assert error_balanced < 0.5 * error_plain


def test_balanced_record_round_trips(tmp_path):
    model = OutlierBlock().eval()
    batches = _batches(3, 2)
    qmodel, config, record, fused = _flow(tmp_path, model, batches, "  dmq_balancer {}\n")
    layers = quant_layers(qmodel)
    stored = read_record(record)
    for name, layer in layers.items():
        assert stored[name].tensor_balance_factor == tuple(layer.balance.tolist())
        assert len(stored[name].tensor_balance_factor) == layer.layer.in_features
    assert "tensor_balance_factor" in Path(record).read_text()
    write_record(str(tmp_path / "again.txt"), stored)
    assert (tmp_path / "again.txt").read_text() == Path(record).read_text()
    (tmp_path / "copy.txt").write_text(Path(record).read_text())
    assert read_record(str(tmp_path / "copy.txt")) == stored  # parsed from text, not from the writer's cache


def test_preprocess_record_holds_the_factors_alone(tmp_path):
    model = OutlierBlock().eval()
    batches = _batches(4, 3)
    config, record = str(tmp_path / "config.json"), str(tmp_path / "record.txt")
    amct.create_quant_config(config, model, batches[0], config_defination=_cfg(tmp_path, "  dmq_balancer {}\n"))
    pre = quantize_preprocess(config, record, model, batches[0])
    with torch.no_grad():
        pre(batches[0])
        assert Path(record).read_text() == ""  # batch_num is 2: not yet
        pre(batches[1])
    stored = read_record(record)
    assert set(stored) == {"fc1", "fc2", "head"} and "scale_d" not in Path(record).read_text()
    inputs = torch.cat(batches[:2])
    expected = dmq.balance_factors(model.norm1(inputs).abs().amax(dim=(0, 1)), model.fc1.weight.abs().amax(0), 0.5)
    assert stored["fc1"].tensor_balance_factor == tuple(expected.tolist())


@pytest.mark.parametrize("balancer, strength", [("  dmq_balancer {}\n", 0.5),
                                                ("  dmq_balancer { migration_strength: 0.3 }\n", 0.3)])
def test_cfg_balancer_runs_to_save_model_with_parity(tmp_path, balancer, strength):
    torch.manual_seed(0)
    model = OutlierMLP().eval()
    qmodel, config, record, fused = _flow(tmp_path, model, _batches(5, 2, outliers=True), balancer)
    assert {layer.dmq_balancer_param for layer in load_json(config).layers.values()} == {strength}
    report = amct.save_model(fused, record, str(tmp_path / "out"))
    assert all(result["ok"] for result in report["parity"].values()), report["parity"]
    deploy = onnx.load(str(tmp_path / "out_deploy_model.onnx"))
    assert {n.name for n in deploy.graph.node if n.op_type == "Mul"} >= {"fc1.balance", "fc2.balance", "head.balance"}


class ConvBlock(nn.Module):
    """Convs of every kind DMQ balances: a stem with BN (folded first), grouped, depthwise, 1D and transposed."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.grouped, self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.up, self.line = nn.ConvTranspose2d(8, 4, 2, stride=2), nn.Conv1d(4, 4, 3, padding=1)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)
            self.bn.weight[2] = 20.0  # an outlier channel into the grouped conv

    def forward(self, x):
        x = torch.relu(self.depthwise(torch.relu(self.grouped(torch.relu(self.bn(self.stem(x)))))))
        x = self.up(x)
        return self.line(x.flatten(2)[..., :64])


def test_conv_layers_balance_exactly_and_export_with_parity(tmp_path):
    torch.manual_seed(0)
    model = ConvBlock().eval()
    batches = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    for name in ("grouped", "depthwise", "up", "line"):  # the balanced float layer computes the same function
        layer = model.get_submodule(name)
        balanced = copy.deepcopy(layer)
        channels = dmq.weight_channel_max(layer).numel()
        factors = torch.rand(channels) * 4 + 0.25
        dmq.scale_weight(balanced, factors)
        x = torch.randn((2, channels, 8) if name == "line" else (2, channels, 6, 6))
        torch.testing.assert_close(balanced(x * dmq.inverse_view(layer, factors)), layer(x), rtol=1e-4, atol=1e-5)
    qmodel, config, record, fused = _flow(tmp_path, model, batches, "  dmq_balancer {}\n")
    assert {name for name, layer in quant_layers(qmodel).items() if layer.balance is not None} == \
        {"stem", "grouped", "depthwise", "up", "line"}
    report = amct.save_model(fused, record, str(tmp_path / "out"))
    assert all(result["ok"] for result in report["parity"].values()), report["parity"]


def test_quantize_model_without_the_pre_pass_says_what_to_run(tmp_path):
    model = OutlierBlock().eval()
    x = _batches(6, 1)[0]
    config = str(tmp_path / "config.json")
    amct.create_quant_config(config, model, x, config_defination=_cfg(tmp_path, "  dmq_balancer {}\n"))
    with pytest.raises(RuntimeError, match=r"holds no tensor_balance_factor.*run quantize_preprocess"):
        amct.quantize_model(config, str(tmp_path / "m.onnx"), str(tmp_path / "record.txt"), model, x)


def test_preprocess_without_balanced_layers_is_refused(tmp_path):
    model = OutlierBlock().eval()
    x = _batches(7, 1)[0]
    config = str(tmp_path / "config.json")
    amct.create_quant_config(config, model, x, config_defination=_cfg(tmp_path, ""))
    with pytest.raises(ConfigError, match="no quantized layer has dmq_balancer_param"):
        quantize_preprocess(config, str(tmp_path / "record.txt"), model, x)


@pytest.mark.parametrize("value", ["1.5", "-0.1"])
def test_bad_migration_strength_is_a_config_error_naming_the_field(tmp_path, value):
    path = _cfg(tmp_path, f"  dmq_balancer {{ migration_strength: {value} }}\n")
    with pytest.raises(ConfigError, match=rf"quant\.cfg:2: field 'dmq_balancer\.migration_strength': got {value}"):
        config_from_cfg(path, {"fc1": ("Linear",)})


def test_the_native_api_refuses_a_balancer_it_cannot_run():
    model = OutlierBlock().eval()
    with pytest.raises(ConfigError, match="only the AMCT flow runs"):
        amct.default_config(model, _batches(7, 1)[0], rules=[amct.Rule(dmq_balancer_param=0.5)])
