"""Block reconstruction: lowers the blocks' output error on held-out inputs, finds blocks and their windows on its
own, is repeatable, and runs from the JSON config through the AMCT calls to exported models in parity."""
import json

import pytest
import torch
from tiny_models import BlockNet, ConvNet, blocknet, convnet

import openamct as amct
from openamct.amct.config_files import load_json
from openamct.core import block_learning, reconstruction
from openamct.core.api import quant_layers
from openamct.core.config import ConfigError, ReconstructionParams, Rule
from openamct.core.simulation import simulating

W4 = [Rule(weight={"num_bits": 4})]


def _calibration(n=4, batch=8):
    torch.manual_seed(1)
    return [BlockNet.example_input(batch) for _ in range(n)]


def _quantized(model, params, calib, rules=W4):
    config = amct.default_config(model, calib[0], batch_num=len(calib), rules=rules, reconstruction=params)
    return amct.quantize(model, config, lambda m: [m(b) for b in calib], calib[0])


def _block_outputs(model, x):
    outputs = {}
    hooks = [model.get_submodule(f"blocks.{i}").register_forward_hook(
        lambda module, args, out, i=i: outputs.__setitem__(i, out)) for i in range(2)]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return [outputs[i] for i in range(2)]


def test_reconstruction_lowers_the_residual_blocks_output_error_on_held_out_inputs():
    model, calib = blocknet(), _calibration()
    torch.manual_seed(2)
    held_out = BlockNet.example_input(64)
    exact = _block_outputs(model, held_out)
    errors = {}
    for name, params in (("gptq", None), ("reconstructed", ReconstructionParams(num_iteration=200, batch_size=8))):
        outputs = _block_outputs(_quantized(model, params, calib), held_out)
        errors[name] = [float(((a - b) ** 2).mean()) for a, b in zip(outputs, exact)]
    for gptq, reconstructed in zip(errors["gptq"], errors["reconstructed"]):
        assert reconstructed < 0.95 * gptq, errors


def test_the_automatic_rule_takes_modules_of_up_to_four_layers_and_single_layers_outside_them():
    model, calib = blocknet(), _calibration(n=1)
    qmodel = _quantized(model, None, calib)
    layers = quant_layers(qmodel)
    floats = reconstruction.float_parameters(layers)
    blocks, chained = reconstruction.find_blocks(qmodel, layers, floats, [((calib[0],), {})])
    assert blocks == [("stem", ["stem.0"]), ("blocks.0", ["blocks.0.conv1", "blocks.0.conv2"]),
                      ("blocks.1", ["blocks.1.conv1", "blocks.1.conv2"]),
                      ("blocks.2", ["blocks.2.conv", "blocks.2.squeeze", "blocks.2.excite"]), ("head", ["head"])]
    assert chained == {"blocks.0", "blocks.1", "blocks.2"}  # the head reads the pooled map, not blocks.2's output


@pytest.mark.parametrize("names, message", [
    (["blocks.9"], "'blocks.9' is not a module of the model"),
    (["stem.2"], "'stem.2' holds no quantized layer"),
    (["blocks", "blocks.0"], "the blocks overlap"),
])
def test_named_blocks_that_cannot_be_reconstructed_are_config_errors(names, message):
    model, calib = blocknet(), _calibration(n=1)
    with pytest.raises(ConfigError, match=message):
        _quantized(model, ReconstructionParams(blocks=names, num_iteration=2), calib)


def test_a_module_called_with_two_tensors_is_refused_as_a_block():
    class Pair(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 1)

        def forward(self, x, y):
            return self.conv(x) + y

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pair = Pair()

        def forward(self, x):
            return self.pair(x, x)

    with pytest.raises(ConfigError, match="'pair' is not called once per forward with one tensor"):
        _quantized(Net(), ReconstructionParams(blocks=["pair"], num_iteration=2), _calibration(n=1))


def test_windows_are_measured_local_blocks_get_them_with_their_margin_global_ones_do_not():
    model = blocknet()
    torch.manual_seed(3)
    features = torch.rand(2, 16, 32, 32)
    with torch.no_grad():
        residual, squeeze = model.blocks[0], model.blocks[2]
        windows = block_learning.Windows(residual, features, residual(features))
        assert (windows.side, windows.margin) == (block_learning.WINDOW, 2)  # two 3x3 convs: two pixels
        assert block_learning.Windows(squeeze, features, squeeze(features)).side is None


def test_a_block_learns_only_on_samples_not_held_aside_and_is_kept_as_calibrated_where_they_get_worse():
    """The held-aside samples' targets are the block's own output as calibrated (plus a trace of noise), the others'
    the float block's: learning must lower the error on the latter only, so the state kept is the calibrated one."""
    model, calib = blocknet(), _calibration(n=1)
    qmodel = _quantized(model, None, calib)
    block = qmodel.blocks[0]
    members = {name: layer for name, layer in quant_layers(qmodel).items() if name.startswith("blocks.0.")}
    floats = reconstruction.float_parameters(members)
    torch.manual_seed(4)
    x = torch.rand(2 * block_learning.HELD_ASIDE + 32, 16, 32, 32)
    with torch.no_grad(), simulating():
        target = block(x)
    with reconstruction.float_model(members, floats), torch.no_grad():
        target[block_learning.HELD_ASIDE:] = block(x[block_learning.HELD_ASIDE:]).mul(1.2)
    target[:block_learning.HELD_ASIDE] += 1e-4 * torch.randn_like(target[:block_learning.HELD_ASIDE])
    weights = {name: layer.layer.weight.clone() for name, layer in members.items()}
    scales = {name: layer.input_quantizer.scale.clone() for name, layer in members.items()}
    windows = block_learning.Windows(block, x, target)
    assert windows.side is None  # the targets are no function of windows: learned on whole maps
    picked, draw = [], windows.draw
    windows.draw = lambda *args: picked.append(args[3]) or draw(*args)
    params = ReconstructionParams(num_iteration=100, batch_size=8)
    before, after = block_learning.reconstruct_block(block, members, floats, x, x, target, windows, params, "b")
    assert len(picked) == 100 and int(torch.cat(picked).min()) >= block_learning.HELD_ASIDE
    assert after == before
    for name, layer in members.items():
        assert torch.equal(layer.layer.weight, weights[name]), name
        assert torch.equal(layer.input_quantizer.scale, scales[name]), name


def test_reconstruction_is_repeatable_and_keeps_weights_on_their_grids():
    model, calib = blocknet(), _calibration(n=2)
    params = ReconstructionParams(num_iteration=30, batch_size=4)
    first, second = (_quantized(model, params, calib) for _ in range(2))
    for (name, a), b in zip(quant_layers(first).items(), quant_layers(second).values()):
        assert torch.equal(a.layer.weight, b.layer.weight), name
        assert torch.equal(a.input_quantizer.scale, b.input_quantizer.scale), name
        codes = a.layer.weight / a.weight_scales().reshape(-1, *[1] * (a.layer.weight.dim() - 1))
        assert torch.allclose(codes, codes.round(), atol=1e-3), name
        assert codes.min() >= -8.001 and codes.max() <= 7.001  # INT4


def test_block_reconstruction_from_the_json_config_exports_in_parity(tmp_path):
    model, x = convnet(), ConvNet.example_input(4)
    config, record, fused = (str(tmp_path / name) for name in ("config.json", "record.txt", "fused.onnx"))
    amct.create_quant_config(config, model, x)
    data = json.loads((tmp_path / "config.json").read_text())
    data["block_reconstruction"] = {"num_iteration": 20, "batch_size": 4, "blocks": ["conv1", "pw"]}
    (tmp_path / "config.json").write_text(json.dumps(data))
    assert load_json(config).reconstruction == ReconstructionParams(blocks=("conv1", "pw"), num_iteration=20,
                                                                    batch_size=4)
    calib = amct.quantize_model(config, fused, record, model, x)
    with torch.no_grad():
        calib(x)
        calib(ConvNet.example_input(4))
    report = amct.save_model(fused, record, str(tmp_path / "out"))
    assert all(result["ok"] for result in report["parity"].values())


def test_the_json_config_writes_and_reads_block_reconstruction_back(tmp_path):
    model, x = convnet(), ConvNet.example_input(1)
    params = ReconstructionParams(blocks=("pw",), num_iteration=7, drop_prob=0.25, beta_range=(10.0, 3.0))
    config = amct.default_config(model, x, reconstruction=params)
    amct.amct.config_files.save_json(config, str(tmp_path / "c.json"))
    assert load_json(str(tmp_path / "c.json")).reconstruction == params


@pytest.mark.parametrize("field, value, message", [
    ("num_iteration", 0, "block_reconstruction.num_iteration': got 0"),
    ("drop_prob", 1.0, "block_reconstruction.drop_prob': got 1.0"),
    ("beta_range", [2, 20], r"block_reconstruction.beta_range': got \[2, 20\]"),
    ("batch_size", "8", "block_reconstruction.batch_size': got '8'"),
    ("blocks", "pw", "block_reconstruction.blocks'"),
    ("iterations", 5, "unknown field 'iterations'"),
])
def test_bad_block_reconstruction_values_are_config_errors_naming_the_field(tmp_path, field, value, message):
    model, x = convnet(), ConvNet.example_input(1)
    config = str(tmp_path / "config.json")
    amct.create_quant_config(config, model, x)
    data = json.loads((tmp_path / "config.json").read_text())
    data["block_reconstruction"] = {field: value}
    (tmp_path / "config.json").write_text(json.dumps(data, indent=4))
    with pytest.raises(ConfigError, match=message) as error:
        load_json(config)
    assert str(error.value).startswith(f"{config}:")


def test_block_reconstruction_keeps_nuq_weights_on_their_codebooks():
    model, calib = blocknet(), _calibration(n=2)
    rules = [Rule(types="Conv2d", weight={"wts_algo": "nuq_quantize", "num_steps": 8})]
    gptq = quant_layers(_quantized(model, None, calib, rules))
    qmodel = _quantized(model, ReconstructionParams(num_iteration=120, batch_size=4), calib, rules)
    moved = 0
    for name, layer in quant_layers(qmodel).items():
        if layer.weight_quantizer.levels is None:
            continue
        codes = layer.layer.weight / layer.weight_scales().reshape(-1, 1, 1, 1)
        levels = torch.as_tensor(layer.weight_quantizer.levels, dtype=codes.dtype)
        rows = codes.reshape(codes.shape[0], -1)
        allowed = levels if levels.dim() == 2 else levels.expand(rows.shape[0], -1)
        assert ((rows[:, :, None] - allowed[:, None, :]).abs().min(2).values < 1e-3).all(), name
        moved += int((layer.layer.weight != gptq[name].layer.weight).sum())
    assert moved > 0  # the roundings were learned, not left as GPTQ chose them
