"""Non-uniform weight quantization: optimal codebooks, packed storage, mapping-file selection, export parity."""
import itertools
import json
import os

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from tiny_models import ConvNet, ExoticNet, convnet, exoticnet

import openamct as amct
from openamct.amct.record import read_record
from openamct.core.algorithms.nuq import codebooks, optimal_levels, snap
from openamct.core.config import ConfigError
from openamct.onnx_export.packed import load_packed, pack, unpack


def cost(counts, levels):
    values = np.arange(-128, 128)
    nearest = np.min(np.abs(values[:, None] - np.asarray(levels)[None, :]), axis=1)
    return float((counts * nearest ** 2).sum())


@pytest.mark.parametrize("seed", range(5))
def test_optimal_levels_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    counts = np.zeros(256)
    counts[128 + rng.integers(-6, 7, 9)] = rng.random(9) + 0.1  # a few weighted codes in -6..6
    brute = min(cost(counts, c) for c in itertools.combinations(range(-6, 7), 3))
    levels = optimal_levels(counts, 3)
    assert len(levels) <= 3 and cost(counts, levels) == pytest.approx(brute)


def test_fewer_codes_than_steps_is_lossless_and_packing_round_trips():
    rng = np.random.default_rng(0)
    codes = np.clip(np.round(rng.normal(0, 25, (16, 8, 3, 3))), -128, 127).astype(np.int8)
    for per_channel, steps in [(False, 16), (False, 32), (True, 16), (True, 128)]:
        books = codebooks(codes.astype(np.int64), np.ones(codes.shape), steps, per_channel)
        snapped = snap(codes, books)
        if per_channel and steps >= 72:
            assert np.array_equal(snapped, codes)  # 72 weights per channel: every code is its own level
        entry = pack(snapped, books)
        assert entry["bits"] == int(np.ceil(np.log2(steps)))
        assert np.array_equal(unpack(entry), snapped)
        assert entry["indices"].nbytes == -(-codes.size * int(entry["bits"]) // 8)


def run_nuq_flow(tmp_path, cfg_text, batches=2):
    os.chdir(tmp_path)
    (tmp_path / "nuq.cfg").write_text(cfg_text)
    model, example = convnet(), ConvNet.example_input()
    amct.create_quant_config("tmp/config.json", model, example, config_defination="nuq.cfg")
    qmodel = amct.quantize_model("tmp/config.json", "tmp/modified_model.onnx", "tmp/record.txt", model, example,
                                 input_names=["input"], output_names=["output"], dynamic_axes={"input": {0: "b"}})
    torch.manual_seed(0)
    with torch.no_grad():
        for _ in range(batches):
            qmodel(ConvNet.example_input(8))
    return qmodel, amct.save_model("tmp/modified_model.onnx", "tmp/record.txt", "out/tiny")


def test_nuq_flow_levels_packing_and_parity(tmp_path):
    qmodel, report = run_nuq_flow(tmp_path, "batch_num: 2\nnuq_config { nuq_quantize { num_steps: 4 "
                                            "codebook: \"layer\" } }\n"
                                            "override_layer_configs { layer_name: \"fc\" calibration_config { "
                                            "arq_quantize { channel_wise: true } } }\n")
    config = json.loads((tmp_path / "tmp/config.json").read_text())
    assert config["conv1"]["weight_quant_params"]["wts_algo"] == "nuq_quantize"
    assert config["fc"]["weight_quant_params"]["wts_algo"] == "arq_quantize"  # per-layer override wins
    records = read_record("tmp/record.txt")
    deploy = {i.name: numpy_helper.to_array(i) for i in onnx.load(report["paths"]["deploy"]).graph.initializer}
    packed = load_packed(report["paths"]["nuq_weights"])
    assert set(packed) == {"conv1", "dw", "pw"} and len(records["fc"].nuq_levels) == 0
    for name, weights in packed.items():
        assert np.array_equal(weights, deploy[f"{name}.weight_quant"])  # exact INT8 weights restored
        levels = np.asarray(records[name].nuq_levels).reshape(-1, 4)  # "auto": one codebook, or one per channel
        rows = weights.reshape(len(levels), -1) if len(levels) > 1 else weights.reshape(1, -1)
        assert all(set(np.unique(row)) <= set(codebook) for row, codebook in zip(rows, levels))
    assert len(np.unique(deploy["fc.weight_quant"])) > 4
    for kind, result in report["parity"].items():
        assert result["ok"], (kind, result)
    total = report["weight_bytes"]["total"]
    assert total["nuq_packed"] < 0.5 * total["int8"]
    log = (tmp_path / "amct_log/amct_pytorch.log").read_text()
    assert "Weight bytes of the quantized layers: fp32" in log and "nuq packed" in log


def test_output_weighting_protects_the_inputs_that_matter(tmp_path):
    """A layer whose input channel 0 carries all the signal: its weights get the finer levels."""
    layer = torch.nn.Linear(2, 4, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.11, 0.9], [0.52, -0.33], [-0.71, 0.26], [0.3, -0.95]]))
    from openamct.core.algorithms.nuq import fit_codebook
    from openamct.core.config import WeightQuantParams
    from openamct.core.quantizers import WeightQuantizer
    params = WeightQuantParams(wts_algo="nuq_quantize", num_steps=4, channel_wise=False, codebook="layer")
    plain, weighted = WeightQuantizer(params, 0), WeightQuantizer(params, 0)
    fit_codebook(plain, layer.weight, torch.ones(()))
    fit_codebook(weighted, layer.weight, torch.tensor([100.0, 0.01]))  # per input channel, broadcast
    error = lambda q: float(((q(layer.weight) - layer.weight)[:, 0] ** 2).sum())
    assert error(weighted) < error(plain)


def correlated_layer(seed=0, out=16, inputs=24, samples=512):
    """A Linear layer and strongly correlated inputs for it (where GPTQ's error feedback matters)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 4, generator=gen) @ torch.randn(4, inputs, generator=gen) \
        + 0.1 * torch.randn(samples, inputs, generator=gen)
    layer = torch.nn.Linear(inputs, out, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out, inputs, generator=gen) * torch.linspace(0.2, 2.0, inputs))
    return layer, x


def nuq_output_error(rounds, codebook="layer", seed=0):
    """Output error of a GPTQ + NUQ-4 Linear layer on its calibration inputs, after `rounds` level refits."""
    from openamct.core.config import ActQuantParams, LayerConfig, WeightQuantParams
    from openamct.core.layer import QuantLayer
    from openamct.core.quantizers import ActQuantizer
    from openamct.core.weights import finish_weights
    layer, x = correlated_layer(seed)
    original = layer.weight.detach().clone()
    params = WeightQuantParams(wts_algo="nuq_quantize", num_steps=4, num_of_iteration=rounds, codebook=codebook,
                               bias_correction=False)
    wrapped = QuantLayer(layer, LayerConfig(weight=params), ActQuantizer(ActQuantParams(), False, 1, None, "fc"),
                         "fc", 0)
    with torch.no_grad():
        wrapped(x)
    wrapped.input_quantizer.finish()
    finish_weights([wrapped])
    with torch.no_grad():
        delta = wrapped.weight_quantizer(layer.weight).double() - original.double()
        return float(((x.double() @ delta.t()) ** 2).mean()), wrapped


@pytest.mark.parametrize("codebook", ["layer", "channel"])
def test_level_refits_lower_the_output_error(codebook):
    for seed in range(3):
        plain, _ = nuq_output_error(0, codebook, seed)
        refined, wrapped = nuq_output_error(3, codebook, seed)
        assert refined < 0.95 * plain
        quantizer, weight = wrapped.weight_quantizer, wrapped.layer.weight
        codes = weight / quantizer.scales(weight).reshape(-1, 1)
        assert torch.allclose(codes, torch.round(codes), atol=1e-4)  # the weights sit on their refitted levels
        levels = np.atleast_2d(quantizer.levels)
        for row, book in zip(torch.round(codes).int().numpy(), levels if len(levels) > 1 else levels.repeat(16, 0)):
            assert set(row.tolist()) <= set(book.tolist())


def test_auto_codebook_per_channel_for_thin_layers_and_where_the_codebooks_are_cheap():
    from openamct.core.algorithms.nuq import per_channel_codebooks
    assert per_channel_codebooks("auto", (1000, 1280), 16)  # 16 bytes of levels for 640 bytes of indices
    assert per_channel_codebooks("auto", (480, 80, 1, 1), 16)  # thin: 80 weights a channel
    assert not per_channel_codebooks("auto", (1152, 192, 1, 1), 16)  # 16 bytes of levels for 96 bytes of indices
    assert per_channel_codebooks("channel", (8, 9999), 16) and not per_channel_codebooks("layer", (96, 16, 1, 1), 16)
    _, wrapped = nuq_output_error(0, codebook="auto")  # 24 weights a channel: a codebook each
    assert np.asarray(wrapped.weight_quantizer.levels).shape == (16, 4)


def test_auto_codebook_in_a_cfg(tmp_path):
    os.chdir(tmp_path)
    (tmp_path / "nuq.cfg").write_text('nuq_config { nuq_quantize { num_steps: 4 codebook: "auto" } }\n')
    amct.create_quant_config("c.json", convnet(), ConvNet.example_input(), config_defination="nuq.cfg")
    assert json.loads((tmp_path / "c.json").read_text())["pw"]["weight_quant_params"]["codebook"] == "auto"


def test_size_rule_keeps_depthwise_and_thin_layers_uniform():
    from openamct.core.algorithms.nuq import size_rule as nuq_size_rule
    assert nuq_size_rule((1000, 1280), 16) and nuq_size_rule((1152, 192, 1, 1), 16)
    assert not nuq_size_rule((1152, 1, 5, 5), 16)  # 25 weights a channel: a depthwise conv
    assert not nuq_size_rule((96, 16, 1, 1), 16) and not nuq_size_rule((8, 8), 16)


def test_size_rule_wants_a_quarter_of_the_bytes_saved():
    """Thin layers need per-channel codebooks, which can eat the saving of the shorter indices."""
    from openamct.core.algorithms.nuq import index_bits
    from openamct.core.algorithms.nuq import size_rule as nuq_size_rule
    assert not nuq_size_rule((480, 80, 1, 1), 32)  # 80 x 5/8 bytes + 32 codebook bytes a channel: more than INT8
    assert nuq_size_rule((480, 80, 1, 1), 32, codebook="layer")  # one codebook: 5/8 of the bytes
    assert nuq_size_rule((80, 480, 1, 1), 32) and index_bits(32) == 5
    assert nuq_size_rule((576, 96, 1, 1), 16)  # 96 / 2 + 16 bytes a channel: 2/3 of INT8
    assert not nuq_size_rule((240, 40, 1, 1), 16)  # 40 / 2 + 16: 9/10


def atc_dump(flagged: dict) -> dict:
    ops = []
    for name, compress in flagged.items():
        attrs = [{"key": "_datadump_original_op_names", "value": {"list": {"s": [name, f"{name}.dequant"]}}}]
        if compress:
            attrs.append({"key": "_fe_weight_compress", "value": {"b": True}})
        ops.append({"name": f"fused_{name}", "type": "Conv2D", "attr": attrs})
    return {"name": "model", "graph": [{"name": "g", "op": ops}]}


def test_mapping_file_picks_exactly_the_flagged_layers(tmp_path):
    # flagged by ONNX node name (as an ATC dump of our deploy model names them) and by layer name
    dump = atc_dump({"/conv1/Conv": True, "/dw/Conv": False, "pw": True, "/fc/Gemm": False})
    (tmp_path / "map.json").write_text(json.dumps(dump))
    _, report = run_nuq_flow(tmp_path, 'batch_num: 2\nnuq_config { mapping_file: "map.json" '
                                       'nuq_quantize { num_steps: 8 } }\n')
    assert set(load_packed(report["paths"]["nuq_weights"])) == {"conv1", "pw"}


@pytest.mark.parametrize("cfg,message", [
    ("nuq_config { nuq_quantize { num_steps: 1 } }\n", "num_steps"),
    ("nuq_config { nuq_quantize { num_steps: 300 } }\n", "num_steps"),
    ('nuq_config { mapping_file: "map.json" nuq_quantize { num_steps: 16 } }\n', "not an ATC JSON dump"),
    ('nuq_config { mapping_file: "none.json" nuq_quantize { num_steps: 16 } }\n', "mapping file not found"),
    ('nuq_config { nuq_quantize { num_steps: 4 codebook: "group" } }\n', "codebook"),
])
def test_bad_nuq_config(tmp_path, cfg, message):
    os.chdir(tmp_path)
    (tmp_path / "map.json").write_text('{"layers": []}')
    (tmp_path / "nuq.cfg").write_text(cfg)
    with pytest.raises(ConfigError, match=message):
        amct.create_quant_config("c.json", convnet(), ConvNet.example_input(), config_defination="nuq.cfg")


def test_nuq_on_a_layer_type_that_cannot_take_it(tmp_path):
    os.chdir(tmp_path)
    (tmp_path / "nuq.cfg").write_text('batch_num: 1\n'
                                      'override_layer_configs {\n  layer_name: "c1"\n'
                                      '  calibration_config { nuq_quantize { num_steps: 16 } }\n}\n')
    with pytest.raises(ConfigError, match=r"nuq.cfg:4: layer 'c1' \(Conv1d\) cannot take nuq_quantize"):
        amct.create_quant_config("c.json", exoticnet(), ExoticNet.example_input(), config_defination="nuq.cfg")


def test_mapping_file_naming_no_layer(tmp_path):
    os.chdir(tmp_path)
    (tmp_path / "map.json").write_text(json.dumps(atc_dump({"Conv_10": True})))
    (tmp_path / "nuq.cfg").write_text('nuq_config { mapping_file: "map.json" nuq_quantize { num_steps: 16 } }\n')
    with pytest.raises(ConfigError, match="flags no Conv2d/Linear layer of this model"):
        amct.create_quant_config("c.json", convnet(), ConvNet.example_input(), config_defination="nuq.cfg")


@pytest.mark.parametrize("codebook", ["layer", "channel"])
def test_solves_of_one_nuq_layer_together_equal_separate_solves(codebook):
    """GPTQ solves entries that share one NUQ quantizer together (the cross-validated damping's ten solves of a
    layer): each comes out as its own solve, on the codebook."""
    from openamct.core.algorithms import gptq
    _, wrapped = nuq_output_error(0, codebook)
    layer, x = correlated_layer(1)
    quantizer = wrapped.weight_quantizer
    quantizer.fixed_scales = quantizer.scales(layer.weight)
    hessians = [x[:256].t() @ x[:256] / 256, x[256:].t() @ x[256:] / 256]
    together = gptq.gptq_layers([layer.weight] * 2, hessians, [quantizer] * 2, damp=[0.01, 0.3])
    for hessian, damp, joint in zip(hessians, (0.01, 0.3), together):
        torch.testing.assert_close(joint, gptq.gptq_layers([layer.weight], [hessian], [quantizer], damp=damp)[0])
    assert not torch.equal(*together)
    codes = torch.round(together[0] / quantizer.fixed_scales.reshape(-1, 1)).int().numpy()
    levels = np.atleast_2d(quantizer.levels)
    for row, book in zip(codes, levels if len(levels) > 1 else levels.repeat(len(codes), 0)):
        assert set(row.tolist()) <= set(book.tolist())
