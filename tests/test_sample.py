"""samples/resnet101: AMCT's ResNet-101 calibration and retrain (QAT) samples run as a user runs them (subprocess,
cwd = sample root).

The model file is a random state dict with the real ResNet-101 keys and the images are 2 of the shared sample, so
each run takes about a minute on 2 CPU cores; the accuracies are not meaningful, the layout and the lines are.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE_DIR

from openamct.app.models.resnet import ResNet101

REPO = Path(__file__).parents[1]
SAMPLE = REPO / "samples" / "resnet101"
SCRIPT = SAMPLE / "src" / "resnet-101_calibration.py"
RETRAIN_SCRIPT = SAMPLE / "src" / "resnet-101_retrain.py"
IMAGES = {"n01440764_tench.JPEG": 0, "n01443537_goldfish.JPEG": 1}
NUMBER = r"\s*[0-9.]+"


def _run(root, *args, timeout=600, script=SCRIPT):
    # one thread: two OpenMP threads competing with other jobs on a shared 2-core machine run up to 8x slower
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="-1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # never as if launched by torchrun
        env.pop(name, None)
    return subprocess.run([sys.executable, str(script), *args], cwd=root, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _add_images(root):
    images = root / "data" / "images"
    images.mkdir(parents=True)
    for name in IMAGES:
        shutil.copy(SAMPLE_DIR / "images" / name, images / name)
    (images / "image_label.txt").write_text("".join(f"{name} {label}\n" for name, label in IMAGES.items()))


def _add_model(root):
    (root / "model").mkdir()
    torch.manual_seed(0)
    torch.save(ResNet101().state_dict(), root / "model" / "resnet101-5d3b4d8f.pth")


def _add_configs(root):
    shutil.copytree(SAMPLE / "src" / "nuq_conf", root / "src" / "nuq_conf")
    shutil.copytree(SAMPLE / "src" / "retrain_conf", root / "src" / "retrain_conf")


def _add_image_folders(root):
    """data/train and data/val in ImageFolder's layout: one class sub-folder per image (class ids 0 and 1)."""
    for split in ("train", "val"):
        for name in IMAGES:
            folder = root / "data" / split / name.split("_")[0]
            folder.mkdir(parents=True)
            shutil.copy(SAMPLE_DIR / "images" / name, folder / name)


@pytest.fixture(scope="module")
def sample_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("resnet101")
    _add_images(root)
    _add_model(root)
    _add_configs(root)
    _add_image_folders(root)
    return root


@pytest.fixture(scope="module")
def calibration(sample_root):
    return _run(sample_root)


def test_sample_layout_is_amct_s():
    for relative in ("README.md", "src/resnet-101_calibration.py", "src/resnet.py", "src/nuq_conf/nuq_quant.cfg",
                     "src/retrain_conf/retrain.cfg", "model/README.md", "data/images/README.md"):
        assert (SAMPLE / relative).is_file(), relative
    readme = (SAMPLE / "README.md").read_text()
    assert "https://download.pytorch.org/models/resnet101-5d3b4d8f.pth" in readme
    assert "CUDA_VISIBLE_DEVICES=0 python ./src/resnet-101_calibration.py" in readme and "--nuq" in readme
    assert "image_label.txt" in readme and "[INFO] ResNet101 after quantize  top1:" in readme


def test_calibration_writes_amct_outputs(calibration, sample_root):
    assert calibration.returncode == 0, calibration.stderr[-3000:]
    outputs = sample_root / "outputs" / "calibration"
    for relative in ("tmp/config.json", "tmp/record.txt", "tmp/modified_model.onnx",
                     "resnet-101_deploy_model.onnx", "resnet-101_fake_quant_model.onnx"):
        assert (outputs / relative).is_file(), relative
    assert "layer4.2.conv3" in (outputs / "tmp" / "record.txt").read_text()
    log = (sample_root / "amct_log" / "amct_pytorch.log").read_text()
    for kind in ("deploy", "fake_quant"):
        path = os.path.realpath(outputs / f"resnet-101_{kind}_model.onnx")
        assert f"INFO - [AMCT]:[Utils]: The model file is saved in {path}" in log
        assert f"The model file is saved in {path}" in calibration.stderr  # the console, as in AMCT's README


def test_calibration_prints_amct_lines(calibration):
    assert calibration.returncode == 0, calibration.stderr[-3000:]
    lines = calibration.stdout.splitlines()
    before = [line for line in lines if line.startswith("[INFO] ResNet101 before quantize top1:")]
    after = [line for line in lines if line.startswith("[INFO] ResNet101 after quantize  top1:")]
    assert len(before) == len(after) == 1, calibration.stdout
    for line in before + after:
        assert re.fullmatch(r"\[INFO\] ResNet101 (before|after) quantize  ?top1:(.{10}) top5:(.{10})", line), line
        assert re.search(rf"top1:{NUMBER} top5:{NUMBER}$", line), line
    # FP32: 1 batch (2 images); calibration: 2 batches of 1 image; fake-quant ONNX: 1 batch
    assert lines.count("****************iteration:0*****************") == 3
    assert lines.count("****************iteration:1*****************") == 1
    assert sum(line.startswith("******final top1:") for line in lines) == 3


def test_nuq_writes_under_outputs_nuq(sample_root):
    # the flow and its files, not the codebook search: one codebook per layer and no level refits keep it short
    cfg = sample_root / "src" / "nuq_conf" / "nuq_quant.cfg"
    cfg.write_text(cfg.read_text().replace("num_of_iteration: 1", 'num_of_iteration: 0\n        codebook: "layer"'))
    result = _run(sample_root, "--nuq", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = sample_root / "outputs" / "nuq"
    for name in ("resnet-101_deploy_model.onnx", "resnet-101_fake_quant_model.onnx", "resnet-101_nuq_weights.npz"):
        assert (out / name).is_file(), name
    assert "[INFO] ResNet101 after quantize  top1:" in result.stdout
    log = (sample_root / "amct_log" / "amct_pytorch.log").read_text()
    assert "nuq packed" in log and "of int8" in log


def test_missing_model_file_says_what_to_download(tmp_path):
    _add_images(tmp_path)
    result = _run(tmp_path, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "https://download.pytorch.org/models/resnet101-5d3b4d8f.pth" in result.stderr
    assert str(tmp_path / "model" / "resnet101-5d3b4d8f.pth") in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_images_say_where_they_go(tmp_path):
    result = _run(tmp_path, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "image_label.txt" in result.stderr and str(tmp_path / "data" / "images") in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_argument_is_rejected(tmp_path):
    result = _run(tmp_path, "--calibration-batches", "3", timeout=300)
    assert result.returncode == 2 and "unrecognized arguments" in result.stderr


RETRAIN_ARGS = ("--train_set", "data/train", "--eval_set", "data/val", "--train_iter", "2", "--batch_size", "2",
                "--batch_num", "1", "--num_parallel_reads", "0")


@pytest.fixture(scope="module")
def retrain_run(sample_root):
    return _run(sample_root, *RETRAIN_ARGS, "--config_defination", "./src/retrain_conf/retrain.cfg",
                script=RETRAIN_SCRIPT)


def test_retrain_writes_amct_outputs(retrain_run, sample_root):
    assert retrain_run.returncode == 0, retrain_run.stderr[-3000:]
    outputs = sample_root / "outputs" / "retrain"
    for relative in ("ResNet101_deploy_model.onnx", "ResNet101_fake_quant_model.onnx", "tmp/config.json",
                     "tmp/record.txt", "tmp/model_best.pth.tar"):
        assert (outputs / relative).is_file(), relative
    assert "layer4.2.conv3" in (outputs / "tmp" / "record.txt").read_text()
    checkpoint = torch.load(outputs / "tmp" / "model_best.pth.tar", map_location="cpu", weights_only=True)
    assert any(key.endswith("clip_max") for key in checkpoint["state_dict"])
    log = (sample_root / "amct_log" / "amct_pytorch.log").read_text()
    path = os.path.realpath(outputs / "ResNet101_fake_quant_model.onnx")
    assert f"The model file is saved in {path}" in log


def test_retrain_prints_amct_lines(retrain_run):
    assert retrain_run.returncode == 0, retrain_run.stderr[-3000:]
    lines = retrain_run.stdout.splitlines()
    assert "Using CPU, this will be slow" in lines
    assert any(re.fullmatch(r"The origin model top 1 accuracy = [0-9.]+%\.", line) for line in lines), lines
    for stage in ("before", "after"):
        found = [line for line in lines if line.startswith(f"[INFO] ResNet101 {stage} retrain top1:")]
        assert len(found) == 1, retrain_run.stdout
        assert re.fullmatch(rf"\[INFO\] ResNet101 {stage} retrain top1:[0-9.]+% top5:[0-9.]+%", found[0]), found


def test_retrain_help_has_amct_arguments():
    result = _run(REPO, "--help", script=RETRAIN_SCRIPT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for option in ("--config_defination", "--batch_num", "--train_set", "--eval_set", "--num_parallel_reads",
                   "--batch_size", "--learning_rate", "--train_iter", "--print_freq", "--dist_url", "--distributed"):
        assert option in result.stdout, option
    assert "gloo" in result.stdout


@pytest.mark.parametrize("args, message", [
    (("--eval_set", "data/val"), "--train_set"),
    (("--train_set", "data/missing", "--eval_set", "data/val"), "data/missing"),
    (("--train_set", "data/train"), "--eval_set"),
])
def test_retrain_bad_data_paths_are_one_error_line(sample_root, args, message):
    result = _run(sample_root, *args, script=RETRAIN_SCRIPT, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("[ERROR]")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr
