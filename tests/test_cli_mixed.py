"""`openamct calibrate --max-drop/--size-budget` (mixed precision) on the tiny CNN, and the HTML report as a browser
shows it."""
import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
from test_cli import IMAGES, SYNSETS, THREADS, TINY_CNN, _assert_one_line_error, _run

from openamct.app.data import ImageLoader, LabelledImages, Preprocess

IMAGES_USED = 24  # 2 x 4 calibration images, then 16 the search scores on


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny CNN's file and an image list of the first IMAGES_USED images labelled with its FP32 top-1."""
    from openamct.app.models import load_model_file

    folder = tmp_path_factory.mktemp("tiny")
    model_file = folder / "tiny_cnn.py"
    model_file.write_text(TINY_CNN)
    dataset = LabelledImages(IMAGES, Preprocess(), labels=SYNSETS, limit=IMAGES_USED)
    images = torch.cat([x for x, _ in ImageLoader(dataset, batch_size=8)])
    with torch.no_grad():
        predicted = load_model_file(f"{model_file}:build")(images).argmax(1)
    labels = folder / "image_label.txt"
    labels.write_text("".join(f"{image.name} {int(c)}\n" for (image, _), c in zip(dataset.samples, predicted)))
    return model_file, labels


@pytest.fixture(scope="module")
def searched(tiny, tmp_path_factory):
    model_file, labels = tiny
    work = tmp_path_factory.mktemp("work")
    output = work / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        from openamct.app import cli
        code = cli.main(["calibrate", "--model-file", f"{model_file}:build", "--images", str(IMAGES), "--labels",
                         str(labels), "--batch-num", "2", "--batch-size", "4", "--workers", "0", "--max-drop", "20",
                         "--weight-bits", "4,8", "--search-images", "16", "--output", str(output), *THREADS])
    assert code == 0
    return output


def test_mixed_precision_chooses_formats_and_exports_them(searched):
    report = json.loads((searched / "quant_report.json").read_text())
    search = report["mixed_precision"]
    assert set(search["choice"]) == {"conv1", "dw", "pw", "fc"}
    assert set(search["choice"].values()) <= {"4", "8", "float"}
    labels = [t["label"] for t in search["trials"]]
    assert labels[:3] == ["float", "uniform 8", "uniform 4"]
    chosen = next(t for t in search["trials"] if t["label"] == search["chosen"])
    assert chosen["ok"] and chosen["drop"] <= 20 and search["size"] == chosen["size"]
    assert min(t["size"] for t in search["trials"] if t["ok"]) == chosen["size"]  # the smallest that meets it
    config = json.loads((searched / "tmp" / "config.json").read_text())
    for name, option in search["choice"].items():  # the config written is the one chosen
        assert config[name]["quant_enable"] == (option != "float")
        if option != "float":
            assert config[name]["weight_quant_params"]["num_bits"] == int(option)
    assert all(result["ok"] for result in report["parity"].values()), report["parity"]
    for name, option in search["choice"].items():  # the report's layer table says the same
        assert report["layers"][name]["format"] == ("float (config)" if option == "float" else f"INT{option}")
    assert "mixed_precision" in report["timings_s"]


def test_the_html_report_is_self_contained(searched):
    page = (searched / "quant_report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "Mixed precision" in page
    assert page.count("data:image/png;base64,") == 3  # the size curve, the sensitivity and the SQNR plots
    assert "http://" not in page and "https://" not in page and "<script" not in page


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_the_html_report_renders_in_a_browser(searched, tmp_path):
    screenshot = tmp_path / "report.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={screenshot}", "--window-size=1100,1800",
                    (searched / "quant_report.html").as_uri()], check=True, capture_output=True, timeout=120)
    from PIL import Image
    pixels = np.asarray(Image.open(screenshot).convert("L"), dtype=np.float64)
    assert pixels.shape == (1800, 1100)
    rows = pixels.std(axis=1) > 1  # rows with something drawn on them
    assert rows.mean() > 0.5, "the page renders mostly blank"


def test_mixed_precision_bad_arguments(tiny, tmp_path, monkeypatch, capsys):
    model_file, labels = tiny
    monkeypatch.chdir(tmp_path)
    base = ["calibrate", "--model-file", f"{model_file}:build", "--images", IMAGES, "--labels", labels,
            "--batch-num", "2", "--batch-size", "4", "--workers", "0"]
    code, _, err = _run(base + ["--max-drop", "1", "--size-budget", "0.6"], capsys)
    _assert_one_line_error(code, err, "--max-drop or --size-budget, not both")
    code, _, err = _run(base + ["--max-drop", "1", "--weight-bits", "4,3"], capsys)
    _assert_one_line_error(code, err, "--weight-bits", "'3'")
    code, _, err = _run(base + ["--batch-num", "6", "--max-drop", "1"], capsys)
    _assert_one_line_error(code, err, "no more")
