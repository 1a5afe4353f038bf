"""Faults: bad images of every kind, killed and concurrent runs, outputs that cannot be written, a DDP peer that
dies, non-finite weights and activations. Each test states what a user gets instead of a crash or a bad file."""
import json
import logging
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from tiny_models import ConvNet, convnet

import openamct as amct
from openamct.amct.record import read_record
from openamct.app import cli
from openamct.app.data import ImageLoader, LabelledImages, Preprocess
from openamct.core.api import quant_layers
from openamct.core.config import InputError
from openamct.core.fileio import write_text

SRC = Path(__file__).resolve().parents[1] / "src"
TESTS = Path(__file__).resolve().parent
WNID = "n00000001"


def _png_declaring(path: Path, width: int, height: int) -> None:
    """A small valid PNG whose header then claims `width` x `height` pixels (a "decompression bomb")."""
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (tmp_path / "synsets.txt").write_text(WNID + "\n")
    rgb = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / f"{WNID}_rgb.png")
    gray = rgb[:, :, 0]
    Image.fromarray(gray).save(folder / f"{WNID}_gray8.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(folder / f"{WNID}_gray16.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / f"{WNID}_cmyk.jpg")
    Image.fromarray(rgb).convert("RGBA").save(folder / f"{WNID}_rgba.png")
    Image.fromarray(rgb).convert("P").save(folder / f"{WNID}_palette.png")
    _png_declaring(folder / f"{WNID}_bomb.png", 30000, 30000)
    Image.fromarray(rgb).save(folder / f"{WNID}_whole.jpg")
    (folder / f"{WNID}_truncated.jpg").write_bytes((folder / f"{WNID}_whole.jpg").read_bytes()[:300])
    (folder / f"{WNID}_empty.jpg").write_bytes(b"")
    (folder / f"{WNID}_text.jpg").write_text("not an image\n")
    return folder


def _decode(folder: Path, **kwargs) -> tuple[dict, list, str]:
    """(decoded images by name, the skipped ones' names, the warnings' text)."""
    dataset = LabelledImages(folder, Preprocess(resize=32, crop=32), labels=folder.parent / "synsets.txt", **kwargs)
    loader = ImageLoader(dataset, batch_size=4, workers=1)
    with pytest.warns(UserWarning, match="skipped unreadable image") as warned:
        images = [image for batch, _ in loader for image in batch]
    names = [p.name for p, _ in dataset.samples if str(p) not in loader.skipped]
    skipped = sorted(Path(p).name.split("_", 1)[1] for p in loader.skipped)
    return dict(zip(names, images)), skipped, "\n".join(str(w.message) for w in warned)


def test_bad_images_are_skipped_named_and_counted_and_odd_modes_decode(image_folder):
    decoded, skipped, _ = _decode(image_folder)
    assert skipped == ["bomb.png", "empty.jpg", "text.jpg", "truncated.jpg"]
    assert len(decoded) == 7
    gray8, gray16 = decoded[f"{WNID}_gray8.png"], decoded[f"{WNID}_gray16.png"]
    torch.testing.assert_close(gray16, gray8)  # 16-bit gray scaled to 8 bits, not clipped to white
    assert all(torch.isfinite(x).all() and x.shape == (3, 32, 32) for x in decoded.values())


def test_the_cap_on_decoded_pixels_can_be_lowered_and_raised(image_folder):
    _, skipped, warned = _decode(image_folder, max_pixels=40 * 48 // 2 - 1)  # every real image is now too large
    assert len(skipped) == 11 and "--max-image-pixels raises it" in warned
    _, skipped, warned = _decode(image_folder, max_pixels=30000 * 30000)  # the bomb passes, then fails to decode
    assert skipped == ["bomb.png", "empty.jpg", "text.jpg", "truncated.jpg"]
    assert "--max-image-pixels" not in warned


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_get_the_mode_a_plain_open_gives(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_text(str(tmp_path / "report.json"), "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "report.json").stat().st_mode & 0o777 == mode


def test_non_finite_weights_are_refused_naming_layer_and_parameter():
    model, x = convnet(), ConvNet.example_input()
    with torch.no_grad():
        model.pw.weight[0, 0] = float("nan")
        model.bn2.running_var[1] = float("inf")
    with pytest.raises(InputError, match=r"layer 'bn2': running_var holds 1 NaN or Inf"):
        amct.quantize(model, amct.default_config(model, x), lambda m: m(ConvNet.example_input(4)), x)
    with torch.no_grad():
        model.bn2.running_var[1] = 1.0
    with pytest.raises(InputError, match=r"layer 'pw': weight holds 1 NaN or Inf"):
        amct.quantize(model, amct.default_config(model, x), lambda m: m(ConvNet.example_input(4)), x)


def test_overflowing_activations_fall_back_with_a_warning(caplog):
    """GPTQ (and a NUQ codebook fit) on statistics that overflowed float32 give way to nearest rounding (and
    unweighted levels), named in the log and on the layer; IFMR's clip search redoes its sums in float64."""
    logger = logging.getLogger("openamct")  # the AMCT calls of other tests may have stopped its propagation
    logger.addHandler(caplog.handler)
    model, x = convnet(), ConvNet.example_input()
    batch = ConvNet.example_input(4) * 1e30  # finite, but its second moments overflow float32
    config = amct.default_config(model, x, rules=[amct.Rule("pw", weight={"wts_algo": "nuq_quantize",
                                                                          "num_steps": 4})])
    qmodel = amct.quantize(model, config, lambda m: m(batch), x)
    logger.removeHandler(caplog.handler)
    fallbacks = {name: layer.fallback for name, layer in quant_layers(qmodel).items() if layer.fallback}
    assert list(fallbacks) == ["conv1"] and "GPTQ failed" in fallbacks["conv1"]
    assert "rounded to nearest instead" in fallbacks["conv1"]
    assert any("layer 'conv1': GPTQ failed" in r.getMessage() for r in caplog.records)
    scale = float(qmodel.conv1.input_quantizer.scale)  # IFMR's clip: within the search range of the data's max
    assert 0.6 * float(batch.abs().max()) / 255 < scale < 1.4 * float(batch.abs().max()) / 127
    assert torch.isfinite(qmodel(batch)).all()


def test_overflowing_statistics_in_a_nuq_layer_fit_its_levels_to_the_weights(caplog):
    model, x = convnet(), ConvNet.example_input()
    with torch.no_grad():
        model.conv1.weight.mul_(1e18)  # pw's input (after ReLU6 and the residual add) stays large
        model.act1 = torch.nn.Identity()
    config = amct.default_config(model, x, rules=[amct.Rule("pw", weight={"wts_algo": "nuq_quantize",
                                                                          "num_steps": 4})])
    qmodel = amct.quantize(model, config, lambda m: m(ConvNet.example_input(4) * 10), x)
    assert "NUQ codebook fit's input statistics overflowed" in qmodel.pw.fallback
    levels = np.atleast_2d(qmodel.pw.weight_quantizer.levels)
    assert levels.shape[1] == 4 and all(len(set(row)) <= 4 for row in levels.tolist())
    assert torch.isfinite(qmodel(ConvNet.example_input(2) * 10)).all()


# ---------------------------------------------------------------- killed and concurrent runs

FLOW = """
import sys, torch
sys.path.insert(0, {tests!r})
from tiny_models import ConvNet, convnet
import openamct as amct
torch.manual_seed(int(sys.argv[1]))
model, x = convnet(), ConvNet.example_input()
for _ in range(int(sys.argv[2])):
    amct.create_quant_config("out/tmp/config.json", model, x, batch_num=2)
    calib = amct.quantize_model("out/tmp/config.json", "out/tmp/modified_model.onnx", "out/tmp/record.txt", model, x)
    with torch.no_grad():
        calib(ConvNet.example_input(8)); calib(ConvNet.example_input(8))
    amct.save_model("out/tmp/modified_model.onnx", "out/tmp/record.txt", "out/net")
    amct.save_model("out/tmp/modified_model.onnx", "out/tmp/record.txt", "out/net")
"""


def _flow(cwd: Path, seed: int, rounds: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", FLOW.format(tests=str(TESTS)), str(seed), str(rounds)], cwd=cwd,
                            env=dict(os.environ, PYTHONPATH=str(SRC), AMCT_LOG_LEVEL="error"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _assert_outputs_whole(out: Path) -> None:
    """Every output present reads back completely: JSON, record, and ONNX models that pass the checker."""
    for path in out.rglob("*"):
        if path.name.startswith(".openamct-tmp-") or path.is_dir():
            continue
        if path.suffix == ".onnx":
            onnx.checker.check_model(onnx.load(str(path)))
        elif path.name == "config.json":
            json.loads(path.read_text())
        elif path.name == "record.txt" and path.stat().st_size:
            read_record(str(path))


def test_kill_9_leaves_outputs_whole_or_absent_and_the_next_run_cleans_up(tmp_path):
    for delay in (1.5, 2.5, 3.5, 4.5, 5.5):  # from start-up through calibration into the save_model loop
        run = _flow(tmp_path, 0, 20)
        time.sleep(delay)
        run.send_signal(signal.SIGKILL)
        run.wait()
        _assert_outputs_whole(tmp_path / "out")
    assert _flow(tmp_path, 0, 1).wait(timeout=300) == 0
    _assert_outputs_whole(tmp_path / "out")
    leftovers = [p.name for p in (tmp_path / "out").rglob(".openamct-tmp-*")]
    assert not leftovers, leftovers
    assert (tmp_path / "out" / "net_deploy_model.onnx").exists()


def _calibrate_cli(tmp_path, output: str, capsys):
    model_file = tmp_path / "tiny.py"
    model_file.write_text(f"import sys\nsys.path.insert(0, {str(TESTS)!r})\nfrom tiny_models import convnet\n\n"
                          "def build():\n    return convnet()\n")
    images = tmp_path / "images"
    if not images.exists():
        images.mkdir()
        (tmp_path / "synsets.txt").write_text(WNID + "\n")
        for i in range(4):
            Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(images / f"{WNID}_{i}.png")
    code = cli.main(["calibrate", "--model-file", f"{model_file}:build", "--images", str(images), "--labels",
                     str(tmp_path / "synsets.txt"), "--output", output, "--batch-num", "1", "--batch-size", "2",
                     "--workers", "0", "--preprocess", "imagenet"])
    return code, capsys.readouterr()


def test_two_runs_into_one_folder_never_mix_their_files(tmp_path, capsys):
    _calibrate_cli(tmp_path, str(tmp_path / "warm-up"), capsys)  # writes the model file and the images
    command = [sys.executable, "-m", "openamct", "calibrate", "--model-file", f"{tmp_path / 'tiny.py'}:build",
               "--images", str(tmp_path / "images"), "--labels", str(tmp_path / "synsets.txt"), "--output", "out",
               "--batch-num", "1", "--batch-size", "2", "--workers", "0", "--preprocess", "imagenet", "--threads", "1"]
    runs = [subprocess.Popen(command, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(SRC)),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    assert sorted(code for code, _ in results) in ([0, 0], [0, 2]), results
    for code, err in results:  # the second either ran after the first or was refused at once
        assert code == 0 or "another openamct run is writing to" in err
    _assert_outputs_whole(tmp_path / "out")
    assert not list((tmp_path / "out").rglob(".openamct-tmp-*"))


def test_an_unwritable_output_folder_fails_before_calibration(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, captured = _calibrate_cli(tmp_path, "/proc/openamct-out", capsys)
    assert code == 2 and "cannot write the outputs to /proc/openamct-out/tmp" in captured.err
    assert "calibrating" not in captured.err  # no calibration was started
    assert not (tmp_path / "amct_log").exists() or "Calibration finished" not in \
        (tmp_path / "amct_log" / "amct_pytorch.log").read_text()


def test_a_full_disk_fails_before_calibration(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("shutil.disk_usage", lambda path: type("Usage", (), {"free": 1000})())
    code, captured = _calibrate_cli(tmp_path, str(tmp_path / "out"), capsys)
    assert code == 2 and "MB free; the outputs need about" in captured.err
    assert "calibrating" not in captured.err
    assert not (tmp_path / "out" / "tmp" / "record.txt").exists()


# ---------------------------------------------------------------- a DDP peer that dies

DDP = """
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
from tiny_models import ConvNet, convnet
from openamct.app.training import train
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=rank, world_size=2)
torch.manual_seed(rank)
model = torch.nn.parallel.DistributedDataParallel(convnet())

class Dying:
    def __iter__(self):
        for step in range(1000):
            if rank == 1 and step == 3:
                os._exit(3)  # a rank that dies mid-run (out of memory, killed, ...)
            yield ConvNet.example_input(4), torch.randint(0, 10, (4,))

train(model, Dying(), 1000, torch.optim.SGD(model.parameters(), lr=0.01))
"""


def test_a_dying_ddp_rank_ends_the_other_with_a_clear_error(tmp_path):
    port = str(29500 + os.getpid() % 1000)
    env = dict(os.environ, PYTHONPATH=str(SRC))
    runs = [subprocess.Popen([sys.executable, "-c", DDP.format(tests=str(TESTS)), str(rank), port], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    start = time.perf_counter()
    codes = [run.wait(timeout=120) for run in runs]  # never a hang
    assert codes[1] == 3 and codes[0] != 0
    assert time.perf_counter() - start < 120
    assert "PeerLost: rank 0: the distributed run lost a process" in runs[0].stderr.read()


# ---------------------------------------------------------------- QAT killed mid-run

KILLED_AT_STEP_4 = """
import os, signal, sys
from openamct.app import training
from openamct.app.cli import main

original = training.train

def train(*args, checkpoint=None, **kwargs):
    def then_die(state):
        checkpoint(state)
        if state["step"] == 4:
            os.kill(os.getpid(), signal.SIGKILL)  # right after the step-4 checkpoint is on disk
    return original(*args, checkpoint=then_die, **kwargs)

training.train = train
sys.exit(main(sys.argv[1:]))
"""


def test_qat_killed_mid_run_resumes_to_the_result_of_an_uninterrupted_run(tmp_path, capsys):
    _calibrate_cli(tmp_path, str(tmp_path / "warm-up"), capsys)  # writes the model file and the images
    for i in range(4, 12):  # 12 images: 8 train, 4 evaluate
        Image.fromarray(np.full((20, 20, 3), 20 * i, np.uint8)).save(tmp_path / "images" / f"{WNID}_{i}.png")
    options = ["retrain", "--model-file", f"{tmp_path / 'tiny.py'}:build", "--images", str(tmp_path / "images"),
               "--labels", str(tmp_path / "synsets.txt"), "--train", "8", "--batch-size", "2", "--steps", "7",
               "--checkpoint-every", "2", "--mixup", "0.5", "--workers", "1", "--batch-num", "1", "--threads", "1",
               "--preprocess", "imagenet"]
    env = dict(os.environ, PYTHONPATH=str(SRC))

    def run(output, *extra, script=None):
        command = [sys.executable, "-c", script or "import sys\nfrom openamct.app.cli import main\n"
                   "sys.exit(main(sys.argv[1:]))\n", *options, "--output", output, *extra]
        return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    assert run("whole").returncode == 0
    killed = run("resumed", script=KILLED_AT_STEP_4)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "resumed" / "tmp" / "checkpoint.pth").exists()  # it never finished
    resumed = run("resumed", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    whole, again = (json.loads((tmp_path / out / "retrain_report.json").read_text()) for out in ("whole", "resumed"))
    assert len(again["losses"]) == 7 and again["losses"] == whole["losses"]
    states = [torch.load(tmp_path / out / "tmp" / "checkpoint.pth", weights_only=True)["state_dict"]
              for out in ("whole", "resumed")]
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][key], states[1][key]) for key in states[0])
    other = run("resumed", "--resume", "--steps", "9")
    assert other.returncode == 2 and "was written with other options: steps 7 (now 9)" in other.stderr
