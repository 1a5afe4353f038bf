"""AdaRound (`ada_quantize`): learned rounding beats nearest and GPTQ on held-out inputs, ends decided, and runs
from every config form."""
import json

import pytest
import torch
from tiny_models import ConvNet, convnet

import openamct as amct
from openamct.amct.config_files import config_from_cfg, load_json
from openamct.core.algorithms.adaround import adaround, beta_at, learn_rounding
from openamct.core.algorithms.gptq import _extremes, gptq, gptq_depthwise
from openamct.core.config import ConfigError, WeightQuantParams
from openamct.core.quantizers import WeightQuantizer

LAYERS = {"conv1": ("Conv2d",), "dw": ("Conv2d",), "pw": ("Conv2d",), "fc": ("Linear",)}


def _layer_problem(seed=0, out=16, columns=32, rows=2048):
    """A layer's weight and correlated inputs, calibration and held-out drawn alike."""
    generator = torch.Generator().manual_seed(seed)
    mix = torch.randn(columns, columns, generator=generator) * 0.3
    calib = torch.randn(rows, columns, generator=generator) @ mix
    held_out = torch.randn(rows, columns, generator=generator) @ mix
    weight = torch.randn(out, columns, generator=generator) * 0.1
    return weight, calib.t() @ calib / rows, held_out


def _output_error(chosen, weight, inputs):
    return float(((inputs @ (chosen - weight).t()) ** 2).sum(1).mean())


@pytest.mark.parametrize("bits", [4, 8])
def test_adaround_output_error_below_nearest_and_gptq_on_held_out_inputs(bits):
    params = WeightQuantParams(num_bits=bits, rounding="adaround", num_iteration=500)
    errors = {"nearest": 0.0, "gptq": 0.0, "adaround": 0.0}
    for seed in range(4):  # summed over a few layers: on one small layer GPTQ can be the better by a few percent
        weight, hessian, held_out = _layer_problem(seed)
        quantizer = WeightQuantizer(params, 0)
        learned = adaround(weight, hessian, quantizer)
        for name, chosen in (("nearest", WeightQuantizer(params, 0)(weight)),
                             ("gptq", gptq(weight, hessian, WeightQuantizer(params, 0))), ("adaround", learned)):
            errors[name] += _output_error(chosen, weight, held_out)
        codes = learned / quantizer.fixed_scales.reshape(-1, 1)
        assert torch.allclose(codes, codes.round(), atol=1e-4)  # on the grid the export uses
        assert torch.equal(quantizer.scales(learned), quantizer.fixed_scales)  # ARQ's scales, recomputed, agree
    assert errors["adaround"] < 0.8 * errors["nearest"], errors
    if bits == 4:  # at 8 bits GPTQ, free to move a code further than the next step, is as good (why it is the default)
        assert errors["adaround"] < 0.97 * errors["gptq"], errors


def test_soft_roundings_end_at_zero_or_one_and_each_stays_within_one_step_of_the_weight():
    weight, hessian, _ = _layer_problem(seed=1)
    params = WeightQuantParams(num_bits=4, rounding="adaround", num_iteration=2000)
    scale = WeightQuantizer(params, 0).scales(weight).reshape(-1, 1)
    kept = _extremes(weight, True)  # rounded to nearest, their soft values untrained
    soft, codes = learn_rounding(weight, scale, hessian, kept, params)
    assert ((soft > 0.01) & (soft < 0.99))[~kept].float().mean() < 0.02  # a few may rest where the two terms balance
    assert ((codes - weight / scale).abs() < 1 + 1e-5).all()  # floor or ceil, never further


def test_adaround_on_a_depthwise_conv_uses_each_channels_hessian():
    generator = torch.Generator().manual_seed(2)
    channels, taps = 8, 9
    mix = torch.randn(channels, taps, taps, generator=generator)  # neighbouring pixels correlate
    patches = torch.randn(channels, 4096, taps, generator=generator) @ mix
    hessians = patches.transpose(1, 2) @ patches / patches.shape[1]
    weight = torch.randn(channels, 1, 3, 3, generator=generator) * 0.2
    params = WeightQuantParams(num_bits=4, rounding="adaround", num_iteration=500)
    delta = {}
    for name, solve in (("nearest", lambda w, h, q: q(w)), ("gptq", gptq_depthwise), ("adaround", adaround)):
        d = (solve(weight, hessians, WeightQuantizer(params, 0)) - weight).reshape(channels, taps)
        delta[name] = float(torch.einsum("ci,cij,cj->", d, hessians, d))
    assert delta["adaround"] < delta["nearest"] and delta["adaround"] < 1.05 * delta["gptq"], delta


def test_beta_is_annealed_after_the_warm_start():
    params = WeightQuantParams(rounding="adaround", num_iteration=100, beta_range=(20.0, 2.0), warm_start=0.2)
    assert beta_at(19, params) is None
    assert beta_at(20, params) == pytest.approx(20.0)
    assert beta_at(99, params) == pytest.approx(2.0, abs=0.3)


CFG_EVERY_FIELD = """batch_num: 2
common_config {
  ada_quantize { num_iteration: 30 reg_param: 0.02 beta_range_start: 16 beta_range_end: 4 warm_start: 0.1
                 channel_wise: false }
}
"""


@pytest.mark.parametrize("text", ["batch_num: 2\ncommon_config {\n  ada_quantize {}\n}\n", CFG_EVERY_FIELD])
def test_cfg_ada_quantize_parses_with_amct_defaults_or_every_field(tmp_path, text):
    path = tmp_path / "ada.cfg"
    path.write_text(text)
    weight = config_from_cfg(str(path), LAYERS).layers["pw"].weight
    assert weight.rounding == "adaround" and weight.wts_algo == "arq_quantize"
    if text == CFG_EVERY_FIELD:
        assert (weight.num_iteration, weight.reg_param, weight.beta_range, weight.warm_start, weight.channel_wise) \
            == (30, 0.02, (16.0, 4.0), 0.1, False)
    else:
        assert (weight.num_iteration, weight.reg_param, weight.beta_range, weight.warm_start, weight.channel_wise) \
            == (10000, 0.01, (20.0, 2.0), 0.2, True)


def test_ada_quantize_cfg_runs_through_the_amct_calls_and_exports_in_parity(tmp_path):
    cfg = tmp_path / "ada.cfg"
    cfg.write_text(CFG_EVERY_FIELD)
    model, x = convnet(), ConvNet.example_input(4)
    config, record, fused = (str(tmp_path / name) for name in ("config.json", "record.txt", "fused.onnx"))
    amct.create_quant_config(config, model, x, config_defination=str(cfg))
    saved = json.loads((tmp_path / "config.json").read_text())["pw"]["weight_quant_params"]
    assert saved["wts_algo"] == "ada_quantize" and saved["num_iteration"] == 30  # AMCT's spelling, read back below
    assert load_json(config).layers["pw"].weight.rounding == "adaround"
    calib = amct.quantize_model(config, fused, record, model, x)
    assert calib.get_submodule("pw").pipeline == ("adaround", "bias_correction")
    with torch.no_grad():
        calib(x)
        calib(ConvNet.example_input(4))
    report = amct.save_model(fused, record, str(tmp_path / "out"))
    assert all(result["ok"] for result in report["parity"].values())


@pytest.mark.parametrize("field, value, message", [
    ("num_iteration", -5, "num_iteration': got -5"),
    ("beta_range", [2, 20], r"beta_range': got \[2, 20\], expected \[start, end\] with start >= end > 0"),
    ("warm_start", 1.5, "warm_start': got 1.5"),
    ("reg_param", -0.1, "reg_param': got -0.1"),
])
def test_bad_ada_quantize_values_are_config_errors_naming_the_field(tmp_path, field, value, message):
    path = tmp_path / "config.json"
    params = {"wts_algo": "ada_quantize", field: value}
    path.write_text(json.dumps({"batch_num": 1, "pw": {"weight_quant_params": params}}))
    with pytest.raises(ConfigError, match=message):
        load_json(str(path))


def test_cfg_beta_range_end_above_start_names_the_line(tmp_path):
    path = tmp_path / "bad.cfg"
    path.write_text("batch_num: 1\ncommon_config {\n  ada_quantize { beta_range_start: 2 beta_range_end: 20 }\n}\n")
    with pytest.raises(ConfigError, match=r"bad\.cfg:2: .*beta_range"):
        config_from_cfg(str(path), LAYERS)


def test_adaround_with_nuq_codebooks_is_refused_until_it_exists():
    with pytest.raises(ConfigError, match="AdaRound on NUQ codebooks"):
        WeightQuantParams(wts_algo="nuq_quantize", rounding="adaround")


@pytest.mark.parametrize("bits, rounding, runs_on_float", [
    (4, "gptq", True), (4, "adaround", True), (4, "nearest", False), (8, "gptq", False)])
def test_calibration_runs_on_float_weights_only_below_8_bits_where_they_will_be_chosen(bits, rounding,
                                                                                        runs_on_float):
    """Below 8 bits nearest rounding breaks the network that the later layers' statistics are gathered from,
    while GPTQ and AdaRound will choose weights close to the float ones: those are the better guess there."""
    model, x = convnet(), ConvNet.example_input(4)
    config = amct.default_config(model, x, rules=[amct.Rule(weight={"num_bits": bits, "rounding": rounding})])
    qmodel = amct.prepare(model, config, x)
    with torch.no_grad():
        calibrating, reference = qmodel(x), model.eval()(x)  # activations pass through while observed
    assert torch.allclose(calibrating, reference, atol=1e-4) == runs_on_float
