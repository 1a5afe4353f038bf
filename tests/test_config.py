"""Config JSON, simple .cfg and record files: round trips and errors that say where."""
import json

import pytest
import torch
from tiny_models import ConvNet, ExoticNet, convnet, exoticnet

import openamct as amct
from openamct.amct.config_files import config_from_cfg, load_json, save_json
from openamct.amct.record import read_record, write_record
from openamct.core.capture import capture
from openamct.core.config import ActQuantParams, ConfigError
from openamct.core.layer import LayerRecord

LAYERS = {"conv1": ("Conv2d",), "dw": ("Conv2d",), "pw": ("Conv2d",), "fc": ("Linear",)}


def test_create_quant_config_writes_amct_json(tmp_path):
    path = tmp_path / "config.json"
    amct.create_quant_config(str(path), convnet(), ConvNet.example_input(), skip_layers=["fc"], batch_num=3,
                             activation_offset=False)
    data = json.loads(path.read_text())
    assert data["version"] == 1 and data["batch_num"] == 3 and data["activation_offset"] is False
    assert data["do_fusion"] is True and data["skip_fusion_layers"] == []
    assert set(data) - {"version", "batch_num", "activation_offset", "do_fusion", "skip_fusion_layers"} == set(LAYERS)
    assert data["fc"]["quant_enable"] is False and data["conv1"]["quant_enable"] is True
    act = data["conv1"]["activation_quant_params"]
    assert act == {"num_bits": 8, "act_algo": "ifmr", "max_percentile": 0.999999, "min_percentile": 0.999999,
                   "search_range": [0.7, 1.3], "search_step": 0.01}
    assert data["conv1"]["weight_quant_params"] == {"num_bits": 8, "wts_algo": "arq_quantize", "channel_wise": True,
                                                    "rounding": "gptq", "bias_correction": True}
    config = load_json(str(path), known_layers=LAYERS)
    assert config.enabled() == ["conv1", "dw", "pw"] and config.batch_num == 3
    save_json(config, str(tmp_path / "again.json"))  # the file round-trips through the core's config
    assert json.loads((tmp_path / "again.json").read_text()) == data


def test_unknown_skip_layer_lists_near_matches(tmp_path):
    with pytest.raises(ConfigError, match="'conv_1'.*did you mean 'conv1'"):
        amct.create_quant_config(str(tmp_path / "c.json"), convnet(), ConvNet.example_input(), skip_layers=["conv_1"])
    assert not (tmp_path / "c.json").exists()


def test_json_errors_name_file_line_and_field(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"version": 1,\n "batch_num": 1,\n "conv1": {"quant_enable": true,\n  "activation_quant_params"'
                    ': {"num_bits": 8, "act_algo": "ifmr", "search_range": [1.3, 0.7]}}}\n')
    with pytest.raises(ConfigError, match=r"config\.json:3: layer 'conv1': field "
                                          r"'activation_quant_params\.search_range'"):
        load_json(str(path))
    path.write_text('{"version": 1,\n "batch_num": 1,,\n}')
    with pytest.raises(ConfigError, match=r"config\.json:2: invalid JSON"):
        load_json(str(path))
    path.write_text('{"version": 1, "batch_num": 0}')
    with pytest.raises(ConfigError, match=r"config\.json:1: field 'batch_num'"):
        load_json(str(path))
    path.write_text('{"version": 1, "conv9": {"quant_enable": true}}')
    with pytest.raises(ConfigError, match="'conv9'.*did you mean 'conv1'"):
        load_json(str(path), known_layers=LAYERS)


CFG = """# simple config
batch_num: 4
activation_offset: false
skip_layers: "fc"
common_config {
  arq_quantize { channel_wise: true }
  ifmr_quantize { search_range_start: 0.8 search_range_end: 1.2 search_step: 0.02 }
}
override_layer_types {
  layer_type: "Conv2d"
  calibration_config { hfmg_quantize { num_of_bins: 2048 asymmetric: true } }
}
override_layer_configs {
  layer_name: "pw"
  calibration_config { arq_quantize { channel_wise: false } ifmr_quantize { max_percentile: 0.9999 } }
}
"""


def test_cfg_priority_layer_over_type_over_common(tmp_path):
    path = tmp_path / "quant.cfg"
    path.write_text(CFG)
    config = config_from_cfg(str(path), LAYERS)
    assert config.batch_num == 4 and config.activation_offset is False
    assert not config.layers["fc"].quant_enable
    conv1 = config.layers["conv1"]
    assert conv1.activation == ActQuantParams(act_algo="hfmg", num_of_bins=2048, asymmetric=True)
    assert config.asymmetric("conv1") is True
    pw = config.layers["pw"]
    assert pw.activation.act_algo == "ifmr" and pw.activation.max_percentile == pytest.approx(0.9999)
    assert pw.weight.channel_wise is False
    assert config.asymmetric("pw") is False  # no asymmetric field: the global activation_offset decides
    fc = config.layers["fc"]
    assert fc.activation.search_range == (0.8, 1.2) and fc.activation.search_step == pytest.approx(0.02)


@pytest.mark.parametrize("text,where,what", [
    ("batch_num: 2\ncommon_config {\n  ifmr_quantize { serch_step: 0.1 }\n}\n", ":3:", "serch_step"),
    ("batch_num: 2\nskip_layers: \"conv_1\"\n", ":2:", "did you mean 'conv1'"),
    ("batch_num: 0\n", ":1:", "batch_num"),
    ("common_config {\n hfmg_quantize {\n num_of_bins: 1000 } }\n", ":1:", "num_of_bins"),
    ("override_layer_types {\n layer_type: \"Conv9d\"\n calibration_config { } }\n", ":2:", "Conv9d"),
])
def test_cfg_errors_name_file_and_line(tmp_path, text, where, what):
    path = tmp_path / "bad.cfg"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        config_from_cfg(str(path), LAYERS)
    assert f"bad.cfg{where}" in str(error.value) and what in str(error.value)


def test_create_quant_config_from_cfg(tmp_path):
    cfg = tmp_path / "quant.cfg"
    cfg.write_text(CFG)
    out = tmp_path / "config.json"
    amct.create_quant_config(str(out), convnet(), ConvNet.example_input(), skip_layers=["pw"], batch_num=9,
                             config_defination=str(cfg))
    data = json.loads(out.read_text())
    assert data["batch_num"] == 4  # the cfg wins over the positional arguments, as in AMCT
    assert data["pw"]["quant_enable"] is True and data["fc"]["quant_enable"] is False
    assert data["conv1"]["activation_quant_params"]["act_algo"] == "hfmg"


def test_record_round_trip(tmp_path):
    entries = {"conv1": LayerRecord(scale_d=0.5, offset_d=-128, scale_w=(0.25, 0.125), offset_w=(0, 0)),
               "fc": LayerRecord(scale_d=0.1, offset_d=3, scale_w=(0.01,), offset_w=(0,), scale_o=0.2, offset_o=-7)}
    path = tmp_path / "record.txt"
    write_record(str(path), entries)
    text = path.read_text()
    assert 'key: "conv1"' in text and "scale_d: 0.5" in text
    records = read_record(str(path))
    assert list(records) == ["conv1", "fc"]
    assert list(records["conv1"].scale_w) == [0.25, 0.125] and records["conv1"].offset_d == -128
    assert records["fc"].scale_o == pytest.approx(0.2) and records["fc"].offset_o == -7
    assert records["conv1"] == entries["conv1"] and records["conv1"].scale_o is None  # float32-exact values
    path.write_text('record {\n  key: "conv1"\n  value { scale_x: 1 }\n}\n')
    with pytest.raises(ConfigError, match=r"record\.txt:3"):
        read_record(str(path))


def test_inspect_finds_layers_bn_pairs_and_bounds():
    info = capture(convnet(), ConvNet.example_input())
    assert list(info.layers) == ["conv1", "dw", "pw", "fc"]
    assert info.bn_pairs == {"conv1": "bn1", "dw": "bn2"}
    assert info.input_bounds == {"dw": (0.0, 6.0), "pw": (0.0, float("inf"))}
    assert info.output_tensor["pw"] in info.adds and info.input_tensor["dw"] in info.adds


def test_bn_with_two_consumers_is_not_folded():
    class TwoUses(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 1)
            self.bn = torch.nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    info = capture(TwoUses().eval(), torch.randn(1, 3, 4, 4))
    assert info.bn_pairs == {} and "other consumers" in info.bn_not_folded["bn"]


# ---------------------------------------------------------------- native rules

def test_rules_select_by_name_glob_regex_type_and_group_later_ones_winning():
    model, x = convnet(), ConvNet.example_input()
    config = amct.default_config(model, x, rules=[
        amct.Rule(weight={"num_bits": 4}),                                  # every layer
        amct.Rule("re:(dw|pw)", weight={"rounding": "nearest"}),           # regex: a partial change
        amct.Rule(types="Linear", activation=ActQuantParams(act_algo="hfmg")),  # a whole value replaces
        amct.Rule("c*1", weight={"num_bits": 6}),                           # glob
        amct.stem_depthwise_int8(),                                         # group: conv1 (first) and dw
        amct.Rule("fc", quant_enable=False),                                # exact name
    ])
    layers = config.layers
    assert [layers[n].weight.num_bits for n in ("conv1", "dw", "pw", "fc")] == [8, 8, 4, 4]
    assert layers["dw"].weight.rounding == "nearest" and layers["pw"].weight.rounding == "nearest"
    assert layers["conv1"].weight.rounding == "gptq"
    assert layers["fc"].activation.act_algo == "hfmg" and layers["conv1"].activation.act_algo == "ifmr"
    assert config.enabled() == ["conv1", "dw", "pw"]


@pytest.mark.parametrize("rule, message", [
    (lambda: amct.Rule("conv_1", quant_enable=False), r"rule 0 .*'conv_1'.*did you mean 'conv1'"),
    (lambda: amct.Rule("head.*", quant_enable=False), r"rule 0 \(Rule\(layers=\('head\.\*',\).*selects no layer"),
    (lambda: amct.Rule(types="Conv3d", quant_enable=False), "selects no layer"),
    (lambda: amct.Rule(group="stem"), "rule group 'stem'"),
    (lambda: amct.Rule("re:(", quant_enable=False), "invalid regular expression"),
    (lambda: amct.Rule(weight={"bits": 4}), "field 'weight.bits'"),
    (lambda: amct.Rule(wieght={"num_bits": 4}), "field 'rule wieght'"),
    (lambda: amct.Rule(weight={"num_bits": 3}), "field 'weight_quant_params.num_bits'"),
])
def test_bad_rules_are_config_errors_that_say_which(rule, message):
    with pytest.raises(ConfigError, match=message):
        amct.default_config(convnet(), ConvNet.example_input(), rules=[rule()])


def test_nuq_rule_on_a_layer_without_codebook_export_is_refused():
    with pytest.raises(ConfigError, match=r"layer 'c1' \(Conv1d\) cannot take nuq_quantize"):
        amct.default_config(exoticnet(), ExoticNet.example_input(),
                            rules=[amct.Rule(types="Conv1d", weight={"wts_algo": "nuq_quantize", "num_steps": 16})])


def test_each_layer_names_its_weight_pipeline():
    model, x = convnet(), ConvNet.example_input()
    config = amct.default_config(model, x, rules=[
        amct.Rule("conv1", weight={"num_bits": 4}),
        amct.Rule("fc", weight={"wts_algo": "nuq_quantize", "num_steps": 4, "num_of_iteration": 2}),
        amct.Rule("pw", weight={"rounding": "nearest", "bias_correction": False})])
    qmodel = amct.prepare(model, config, x)
    pipelines = {name: qmodel.get_submodule(name).pipeline for name in config.layers}
    assert pipelines == {"conv1": ("gptq", "scale_refit", "bias_correction"), "dw": ("gptq", "bias_correction"),
                         "pw": (), "fc": ("nuq_codebook", "gptq", "nuq_level_refit", "bias_correction")}


# ---------------------------------------------------------------- options openamct cannot honour are refused

@pytest.mark.parametrize("extra, message", [
    ('"version": 2, ', r"config\.json:1: field 'version': got 2"),
    ('"fakequant_precision_mode": "FORCE_FP16_QUANT", ', r"config\.json:1: fakequant_precision_mode FORCE_FP16"),
    ('"fakequant_precision_mode": "FP8", ', r"field 'fakequant_precision_mode': got 'FP8'"),
])
def test_json_refuses_global_fields_it_cannot_honour(tmp_path, extra, message):
    path = tmp_path / "config.json"
    path.write_text("{" + extra + '"batch_num": 1, "conv1": {"quant_enable": true}}')
    with pytest.raises(ConfigError, match=message):
        load_json(str(path))


@pytest.mark.parametrize("entry, message", [
    ('"dmq_balancer_param": 1.5', r"field 'dmq_balancer_param': got 1\.5"),
    ('"wts_params": {}', "unknown field 'wts_params'"),
])
def test_json_refuses_layer_fields_it_cannot_honour(tmp_path, entry, message):
    path = tmp_path / "config.json"
    path.write_text('{"batch_num": 1,\n "conv1": {"quant_enable": true, ' + entry + "}}")
    with pytest.raises(ConfigError, match=rf"config\.json:2: layer 'conv1': .*{message}"):
        load_json(str(path))


@pytest.mark.parametrize("text, line, message", [
    ("batch_num: 1\ncommon_config {\n  dmq_balancer { migration_strength: 1.5 }\n}\n", 2,
     "field 'dmq_balancer.migration_strength': got 1.5"),
    ("batch_num: 1\nfakequant_precision_mode: FORCE_FP16_QUANT\n", 2, "FORCE_FP16_QUANT is not supported"),
    ("batch_num: 1\ncommon_config {\n  ifmr_quantize { dst_type: INT16 }\n}\n", 2, "INT16 activations"),
    ("batch_num: 1\noverride_layer_types {\n layer_type: \"Linear\"\n calibration_config {\n"
     "  hfmg_quantize { dst_type: INT16 } } }\n", 3, "INT16 activations"),
])
def test_cfg_refuses_fields_it_cannot_honour(tmp_path, text, line, message):
    path = tmp_path / "bad.cfg"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"bad\.cfg:{line}: .*{message}"):
        config_from_cfg(str(path), LAYERS)


def test_cfg_activation_dst_type_int8_is_honoured(tmp_path):
    path = tmp_path / "q.cfg"
    path.write_text("common_config { ifmr_quantize { dst_type: INT8 } }\noverride_layer_configs {\n"
                    " layer_name: \"fc\" calibration_config { hfmg_quantize { dst_type: INT8 } } }\n")
    config = config_from_cfg(str(path), LAYERS)
    assert {layer.activation.num_bits for layer in config.layers.values()} == {8}
    assert config.layers["fc"].activation.act_algo == "hfmg"
