"""Config JSON, simple .cfg and record files: round trips and errors that say where."""
import json

import pytest
import torch
from tiny_models import ConvNet, convnet

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
