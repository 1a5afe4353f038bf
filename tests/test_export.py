"""The AMCT flow on tiny models: calibration, record, and both ONNX models against the PyTorch simulation."""
import os

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from tiny_models import ConvNet, ExoticNet, convnet, exoticnet

import openamct as amct
from openamct.amct.record import read_record
from openamct.core.layer import QuantLayer
from openamct.core.primitives import qrange
from openamct.onnx_export import fallback
from openamct.onnx_export.parity import session


def run_flow(tmp_path, model, example, batches, **config_kwargs):
    os.chdir(tmp_path)
    amct.create_quant_config("tmp/config.json", model, example, batch_num=len(batches), **config_kwargs)
    qmodel = amct.quantize_model("tmp/config.json", "tmp/modified_model.onnx", "tmp/record.txt", model, example,
                                 input_names=["input"], output_names=["output"],
                                 dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    with torch.no_grad():
        for batch in batches:
            qmodel(batch)
    report = amct.save_model("tmp/modified_model.onnx", "tmp/record.txt", "out/tiny")
    return qmodel, report


def optimized_ops(path, tmp_path):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]


@pytest.mark.parametrize("algo", ["ifmr", "hfmg"])
def test_convnet_flow_parity_and_integer_kernels(tmp_path, monkeypatch, algo):
    # every layer on integers: save_model's timing would keep the tiny stem conv float where ORT runs it faster so
    # (tests/test_placement.py tests that)
    monkeypatch.setattr(fallback, "slower", lambda ms, than: False)
    torch.manual_seed(0)
    batches = [ConvNet.example_input(8) for _ in range(2)]
    cfg = None
    if algo == "hfmg":
        cfg = tmp_path / "hfmg.cfg"
        cfg.write_text("batch_num: 2\ncommon_config { hfmg_quantize { num_of_bins: 1024 } }\n")
    qmodel, report = run_flow(tmp_path, convnet(), ConvNet.example_input(), batches,
                              config_defination=str(cfg) if cfg else None)
    records = read_record("tmp/record.txt")
    assert set(records) == {"conv1", "dw", "pw", "fc"}
    assert records["dw"].offset_d == -128  # ReLU6 output: the range starts at 0
    assert records["dw"].scale_d <= 6.0 / 255 + 1e-9  # and ends at or below 6, so ORT can drop the Clip
    assert records["pw"].scale_o is not None  # feeds the residual add
    assert len(records["conv1"].scale_w) == 8 and list(records["conv1"].offset_w) == [0] * 8

    for kind, result in report["parity"].items():
        assert result["ok"], (kind, result)
    x = ConvNet.example_input(16)
    with torch.no_grad():
        want = qmodel(x).numpy()
    fake = session(report["paths"]["fake_quant"]).run(None, {"input": x.numpy()})[0]
    np.testing.assert_array_equal(fake, want)  # same arithmetic, step for step, and no ORT fusion reorders it
    # ORT's integer kernels requantize each conv's accumulator in one step, as the simulation does: the same
    # integers, so only the float rounding of the last layer's dequantization (and of the pooling) differs
    deploy = session(report["paths"]["deploy"]).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(deploy, want, rtol=0, atol=1e-5 * np.abs(want).max())

    deploy = onnx.load(report["paths"]["deploy"])
    inits = {i.name: numpy_helper.to_array(i) for i in deploy.graph.initializer}
    assert inits["conv1.weight_quant"].dtype == np.int8 and inits["conv1.bias_quant"].dtype == np.int32
    assert inits["conv1.quant.zero_point"].dtype == np.uint8
    assert not any(v.dtype == np.float32 and v.size > 16 for v in inits.values())  # no float weights left
    ops = optimized_ops(report["paths"]["deploy"], tmp_path)
    assert ops.count("QLinearConv") == 3 and "QGemm" in ops and "Conv" not in ops
    producers = {o: n.op_type for n in deploy.graph.node for o in n.output}
    add = next(n for n in deploy.graph.node if n.op_type == "Add")
    assert [producers[i] for i in add.input] == ["DequantizeLinear"] * 2  # the residual add reads integers
    fake_ops = {n.op_type for n in onnx.load(report["paths"]["fake_quant"]).graph.node}
    assert not fake_ops & {"QuantizeLinear", "DequantizeLinear"} and {"Round", "Clip", "Div"} <= fake_ops


def test_deploy_integers_equal_the_simulation(tmp_path):
    """Every quantized activation of the deploy model, run by ORT's integer kernels, equals the simulation's code
    (dequantize-then-quantize in two float roundings gets ~30 of these 300k codes wrong on this model)."""
    torch.manual_seed(0)
    layers = []
    for cin, cout in ((3, 32), (32, 64), (64, 64), (64, 64)):
        layers += [torch.nn.Conv2d(cin, cout, 3, padding=1), torch.nn.BatchNorm2d(cout), torch.nn.ReLU6()]
    model = torch.nn.Sequential(*layers, torch.nn.Conv2d(64, 16, 1)).eval()
    for bn in model[1::3]:
        bn.running_var.uniform_(0.5, 2)
        bn.running_mean.uniform_(-0.5, 0.5)
    x = torch.randn(16, 3, 32, 32)
    qmodel, report = run_flow(tmp_path, model, x[:1], [x])
    codes = {}

    def keep_codes(name):
        def hook(quantizer, args, out):
            codes[name] = (torch.round(out / quantizer.scale) + quantizer.offset - qrange(8)[0]).numpy()
        return hook

    for name, layer in qmodel.named_modules():
        if isinstance(layer, QuantLayer):
            layer.input_quantizer.register_forward_hook(keep_codes(name))
    with torch.no_grad():
        want = qmodel(x).numpy()
    deploy = onnx.load(report["paths"]["deploy"])
    tensors = [f"{name}.quant.q" for name in codes]
    deploy.graph.output.extend(onnx.ValueInfoProto(name=t) for t in tensors)
    got, *deployed_codes = session(deploy).run(["output"] + tensors, {"input": x.numpy()})
    assert "QLinearConv" in optimized_ops(report["paths"]["deploy"], tmp_path)
    for name, deployed in zip(codes, deployed_codes):
        np.testing.assert_array_equal(deployed, codes[name], err_msg=name)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_fake_quant_weights_and_bias_match_the_record(tmp_path):
    _, report = run_flow(tmp_path, convnet(), ConvNet.example_input(), [ConvNet.example_input(4)])
    records = read_record("tmp/record.txt")
    deploy = {i.name: numpy_helper.to_array(i) for i in onnx.load(report["paths"]["deploy"]).graph.initializer}
    fake = {i.name: numpy_helper.to_array(i) for i in onnx.load(report["paths"]["fake_quant"]).graph.initializer}
    scale_w = np.array(records["pw"].scale_w, dtype=np.float32)
    # AMCT's fake-quant form: the layer on integer codes, then the accumulator scale scale_d * scale_w (as a Div by
    # its inverse, which ONNX Runtime does not fold into the conv)
    np.testing.assert_array_equal(fake["pw.weight_fakequant"], deploy["pw.weight_quant"])
    np.testing.assert_array_equal(fake["pw.bias_fakequant"], deploy["pw.bias_quant"])
    grid = np.float32(records["pw"].scale_d) * scale_w
    np.testing.assert_array_equal(fake["pw.dequant"].ravel(), np.float32(1) / grid)
    assert np.abs(deploy["pw.weight_quant"]).max() <= 128


def test_conv1d_conv3d_convtranspose_flow(tmp_path):
    torch.manual_seed(0)
    qmodel, report = run_flow(tmp_path, exoticnet(), ExoticNet.example_input(), [ExoticNet.example_input(8)])
    assert set(read_record("tmp/record.txt")) == {"c1", "c3", "up", "fc"}
    assert len(read_record("tmp/record.txt")["up"].scale_w) == 5  # ConvTranspose: per output channel (axis 1)
    for result in report["parity"].values():
        assert result["ok"], report


def test_skip_layers_stay_float_and_are_logged(tmp_path, caplog):
    _, report = run_flow(tmp_path, convnet(), ConvNet.example_input(), [ConvNet.example_input(4)],
                         skip_layers=["fc"])
    assert set(read_record("tmp/record.txt")) == {"conv1", "dw", "pw"}
    deploy = onnx.load(report["paths"]["deploy"])
    assert "fc.weight_quant" not in {i.name for i in deploy.graph.initializer}
    log = (tmp_path / "amct_log" / "amct_pytorch.log").read_text()
    assert "Quantize 3 of 4 layers with weights." in log and "fc (Linear): skipped by config" in log


def test_unsupported_layers_are_reported_with_reason(tmp_path):
    class WithLSTM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
            self.fc = torch.nn.Linear(4, 2)
            self.rnn = torch.nn.GRU(2, 2)

        def forward(self, x):
            y = self.fc(self.conv(x).mean((2, 3)))
            return self.rnn(y[None])[0][0]

    os.chdir(tmp_path)
    amct.create_quant_config("c.json", WithLSTM().eval(), torch.randn(1, 3, 8, 8))
    qmodel = amct.quantize_model("c.json", "m.onnx", "r.txt", WithLSTM().eval(), torch.randn(1, 3, 8, 8))
    log = (tmp_path / "amct_log" / "amct_pytorch.log").read_text()
    assert "conv: not quantized: padding_mode 'reflect'" in log
    assert "rnn: not quantized: layer type GRU is not supported" in log
    assert "Quantize 1 of 3 layers with weights." in log
    assert [n for n, m in qmodel.named_modules() if type(m).__name__ == "QuantLayer"] == ["fc"]


def test_parity_check_names_the_first_divergent_layer(tmp_path):
    qmodel, _ = run_flow(tmp_path, convnet(), ConvNet.example_input(), [ConvNet.example_input(8)])
    qmodel.pw.layer.weight.data[:, :4] *= 3  # the simulation no longer matches the exported files from 'pw' on
    report = amct.save_model("tmp/modified_model.onnx", "tmp/record.txt", "out/again")
    for kind in ("deploy", "fake_quant"):
        assert not report["parity"][kind]["ok"]
        assert report["parity"][kind]["first_divergent_layer"] == "pw"
    assert "DIVERGES from layer pw" in (tmp_path / "amct_log" / "amct_pytorch.log").read_text()


def test_model_that_fx_cannot_trace(tmp_path):
    class DataDependent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            y = self.conv(x)
            if float(y.mean()) > 100:  # Python control flow on data: torch.fx.symbolic_trace fails here
                y = -y
            return self.fc(y.mean((2, 3)))

    with pytest.raises(Exception):  # noqa: B017 (whatever torch.fx raises: it cannot trace this model)
        torch.fx.symbolic_trace(DataDependent())
    torch.manual_seed(0)
    _, report = run_flow(tmp_path, DataDependent().eval(), torch.randn(1, 3, 8, 8), [torch.randn(4, 3, 8, 8)])
    assert set(read_record("tmp/record.txt")) == {"conv", "fc"}
    assert all(r["ok"] for r in report["parity"].values())


def test_log_line_format_and_levels(tmp_path):
    import subprocess
    import sys
    script = ("from openamct.amct import amct_log; from openamct.core import log; amct_log.install(); "
              "log.info('hello', 'Utils'); log.debug('quiet', 'Utils')")
    src = os.path.dirname(os.path.dirname(amct.__file__))
    env = dict(os.environ, AMCT_LOG_LEVEL="error", AMCT_LOG_FILE_LEVEL="info", PYTHONPATH=src)
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0 and run.stderr == ""  # console at error level: nothing printed
    lines = (tmp_path / "amct_log" / "amct_pytorch.log").read_text().splitlines()
    assert len(lines) == 1 and lines[0].endswith(" - INFO - [AMCT]:[Utils]: hello")
    env["AMCT_LOG_LEVEL"] = "loud"
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode != 0 and "AMCT_LOG_LEVEL='loud'" in run.stderr


class _ViewsAFeatureMap(ConvNet):
    """ConvNet whose head `.view`s the conv output: code that channels_last activations would break."""

    def forward(self, x):
        x = self.pw(self.act1(self.bn1(self.conv1(x))))
        return self.fc(x.view(x.shape[0], -1).reshape(x.shape[0], 8, -1).mean(2))  # flattens C with H, W


@pytest.mark.parametrize("views", [False, True])
def test_calibration_runs_channels_last_where_the_model_allows(tmp_path, views):
    """The calibration copy stores its conv weights channels_last (the user's model keeps its layout), or keeps the
    default layout, logged, where the forward fails in channels_last; the exported files agree either way."""
    torch.manual_seed(0)
    model = _ViewsAFeatureMap().eval() if views else convnet()
    qmodel, report = run_flow(tmp_path, model, ConvNet.example_input(), [ConvNet.example_input(4)])
    assert model.conv1.weight.is_contiguous()
    assert qmodel.conv1.layer.weight.is_contiguous(memory_format=torch.channels_last) != views
    assert all(result["ok"] for result in report["parity"].values()), report["parity"]
    log = (tmp_path / "amct_log" / "amct_pytorch.log").read_text()
    assert ("the model fails in channels_last" in log) == views


@pytest.mark.parametrize("bias", [True, False])
def test_fused_model_carries_the_calibrated_weights(tmp_path, bias):
    """After calibration the fused model holds the weights and biases calibration chose (a bias too where bias
    correction created one), so save_model's files agree."""
    from openamct.onnx_export.fused import read_fused
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=bias), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 2)).eval()
    qmodel, report = run_flow(tmp_path, model, ConvNet.example_input(), [ConvNet.example_input(4)])
    fused, mapping = read_fused("tmp/modified_model.onnx")
    initializers = {i.name: numpy_helper.to_array(i) for i in fused.graph.initializer}
    nodes = {n.name: n for n in fused.graph.node}
    for name, entry in mapping.items():
        layer = qmodel.get_submodule(name).layer
        weight = initializers[entry["weight"]]
        expected = layer.weight.detach().numpy()
        np.testing.assert_array_equal(weight if weight.shape == expected.shape else weight.T, expected)
        np.testing.assert_array_equal(initializers[nodes[entry["node"]].input[2]], layer.bias.detach().numpy())
    assert all(result["ok"] for result in report["parity"].values()), report["parity"]
