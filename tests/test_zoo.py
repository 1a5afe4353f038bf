"""Tiny versions of the architecture zoo (benchmarks/zoo_models.py) through the AMCT flow and `openamct calibrate
--model-file`, and the runtime-padding Lite0 block exported with its shape arithmetic folded."""
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import SAMPLE_DIR
from test_export import optimized_ops

import openamct as amct
from openamct.app import cli
from openamct.onnx_export import fallback
from openamct.onnx_export.parity import session

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
from zoo_models import ZOO  # noqa: E402

DYNAMIC = {"input": {0: "batch"}, "output": {0: "batch"}}


def amct_flow(tmp_path, name):
    """create_quant_config / quantize_model / two calibration batches / save_model on the tiny model: (model,
    calibrated model, save_model's report)."""
    os.makedirs(tmp_path, exist_ok=True)
    os.chdir(tmp_path)
    torch.manual_seed(1)
    zoo = ZOO[name]
    model, example = zoo.build("tiny"), zoo.example(1, "tiny")
    amct.create_quant_config("tmp/config.json", model, example, batch_num=2)
    qmodel = amct.quantize_model("tmp/config.json", "tmp/modified_model.onnx", "tmp/record.txt", model, example,
                                 input_names=["input"], output_names=["output"], dynamic_axes=DYNAMIC)
    with torch.no_grad():
        for _ in range(2):
            qmodel(*zoo.example(4, "tiny"))
    return model, qmodel, amct.save_model("tmp/modified_model.onnx", "tmp/record.txt", "out/tiny")


@pytest.mark.parametrize("name", sorted(ZOO))
def test_tiny_zoo_model_amct_flow_parity(tmp_path, name):
    model, qmodel, report = amct_flow(tmp_path, name)
    for kind, result in report["parity"].items():
        assert result["ok"], (name, kind, result)
    # the deploy model keeps the dynamic batch axis, and runs the quantized layers on integers
    x = ZOO[name].example(3, "tiny")
    deploy = session(report["paths"]["deploy"])
    out = deploy.run(None, {"input": x[0].numpy()})[0]
    with torch.no_grad():
        assert out.shape == tuple(qmodel(*x).shape) == tuple(model(*x).shape)
    ops = optimized_ops(report["paths"]["deploy"], tmp_path)
    assert any(op.startswith("QLinear") or op in ("QGemm", "MatMulInteger") for op in ops), ops


def test_a_max_pool_shares_its_inputs_quantizer_and_runs_on_integers(tmp_path):
    """ResNet's stem: conv -> ReLU -> MaxPool -> the first block's convs and its residual add. The pool's output is
    quantized with the stem's output quantizer (one scale), so ONNX Runtime pools the integers: no float MaxPool
    in the optimized deploy model, and the simulation still matches it."""
    model, qmodel, report = amct_flow(tmp_path, "resnet18")
    stem, first = qmodel.features[0][0], qmodel.features[2].body[0][0]
    assert stem.output_quantizer is first.input_quantizer
    assert first.input_quantizer.batches_seen == 2  # observed once per forward: on the stem's output
    for kind, result in report["parity"].items():
        assert result["ok"], (kind, result)
    ops = optimized_ops(report["paths"]["deploy"], tmp_path)
    assert "MaxPool" not in ops and any("MaxPool" in op for op in ops), ops


def test_a_linear_on_more_than_two_dims_is_not_quantized_after_and_its_gelu_runs_fused(tmp_path, monkeypatch):
    """ConvNeXt's MLP: Linear (on channels-last maps, so MatMul + Add in ONNX) -> GELU -> Linear. ONNX Runtime
    runs such a Linear as MatMulIntegerToFloat, quantized after or not, so it gets no output quantizer: the GELU
    then reads the float output and ORT fuses bias and GELU into one kernel, where a quantize between them left
    five float ops and two dequantizations. The 2-D classifier Linear keeps its place in the rule (no reader but
    the output here), and the simulation still matches the exported models."""
    monkeypatch.setattr(fallback, "slower", lambda ms, than: False)  # every layer on integers, timing aside
    _, qmodel, report = amct_flow(tmp_path, "convnext")
    block = qmodel.features[2]
    assert block.up.output_quantizer is None and block.down.output_quantizer is None
    assert block.down.input_quantizer is not None  # the GELU's output is still quantized for the next Linear
    for kind, result in report["parity"].items():
        assert result["ok"], (kind, result)
    ops = optimized_ops(report["paths"]["deploy"], tmp_path)
    linears = sum(isinstance(m, torch.nn.Linear) for m in ZOO["convnext"].build("tiny").modules()) - 1
    assert ops.count("MatMulIntegerToFloat") == linears, ops
    assert "Erf" not in ops, ops


def test_runtime_padding_folds_and_its_convs_run_on_integers(tmp_path):
    """The Lite0 blocks written with F.pad amounts computed from x.shape export as the static ones do: no Shape,
    Gather or Pad arithmetic left in the deploy model, every conv reading quantized input and weights, and ORT
    runs the same kernels as on the static model."""
    _, _, report = amct_flow(tmp_path / "runtime", "lite0_runtime_pad")
    deploy = onnx.load(report["paths"]["deploy"])
    ops = [n.op_type for n in deploy.graph.node]
    assert not {"Shape", "Gather", "Pad", "Sub", "Div", "ConstantOfShape"} & set(ops), ops
    producers = {o: n.op_type for n in deploy.graph.node for o in n.output}
    convs = [n for n in deploy.graph.node if n.op_type == "Conv"]
    assert len(convs) == sum(isinstance(m, torch.nn.Conv2d) for m in ZOO["lite0_runtime_pad"].build("tiny").modules())
    assert all(producers[c.input[0]] == producers[c.input[1]] == "DequantizeLinear" for c in convs)
    optimized = optimized_ops(report["paths"]["deploy"], tmp_path)
    _, _, static = amct_flow(tmp_path / "static", "lite0_static")
    assert optimized == optimized_ops(static["paths"]["deploy"], tmp_path)
    # every conv, or all but the last where its float output feeds the pooling (Q/DQ placement, issue 20 item 2)
    assert optimized.count("QLinearConv") >= len(convs) - 1, optimized
    for batch in (1, 16):  # the dynamic batch axis survives the folding
        x = ZOO["lite0_runtime_pad"].example(batch, "tiny")[0]
        assert session(deploy).run(None, {"input": x.numpy()})[0].shape == (batch, 10)


MODEL_FILE = '''
import sys
sys.path.insert(0, {benchmarks!r})
from zoo_models import ZOO


def build():
    return ZOO[{name!r}].build("tiny")
'''


@pytest.mark.parametrize("name", ["mobilenet_v3", "convnext", "lite0_runtime_pad"])
def test_openamct_calibrate_model_file(tmp_path, monkeypatch, capsys, name):
    """`openamct calibrate --model-file` on 224x224 sample images: the tiny models take any input size."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / f"zoo_{name}.py"
    path.write_text(MODEL_FILE.format(benchmarks=str(BENCHMARKS), name=name))
    code = cli.main(["calibrate", "--model-file", f"{path}:build", "--images", str(SAMPLE_DIR / "images"),
                     "--batch-num", "1", "--batch-size", "4", "--eval", "4", "--workers", "0", "--threads", "1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    deploy = tmp_path / "outputs" / "build" / "build_deploy_model.onnx"
    assert deploy.exists() and "DIVERGES" not in out + err
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224), dtype=np.float32)
    assert session(str(deploy)).run(None, {"input": x})[0].shape[0] == 2
