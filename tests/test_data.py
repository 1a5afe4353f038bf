"""Tests of image loading, labelling layouts, skipping unreadable files and accuracy counting."""

import numpy as np
import pytest
import torch
from conftest import SAMPLE_DIR
from PIL import Image

from openamct.app.data import Accuracy, ImageLoader, LabelledImages, Preprocess, top1_gap, topk_hits

SMALL = Preprocess(resize=32, crop=24)


def _image(path, colour=(200, 30, 10), size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _labels(dataset):
    return [label for _, label in dataset.samples]


def test_preprocess_shape_and_normalisation():
    preprocess = Preprocess(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic")
    for size in [(300, 200), (200, 300)]:
        array = preprocess(Image.new("RGB", size, (255, 0, 0)))
        assert array.shape == (3, 224, 224) and array.dtype == np.float32
        np.testing.assert_allclose(array.reshape(3, -1).mean(axis=1), [1, -1, -1], atol=1e-5)
    gray = preprocess(Image.new("L", (256, 256), 255))
    assert gray.shape == (3, 224, 224)
    with pytest.raises(ValueError, match="interpolation"):
        Preprocess(interpolation="nearest")


def test_flat_folder_with_synsets_in_parent(tmp_path):
    (tmp_path / "synsets.txt").write_text("n001 tench\nn002\nn003\n")
    for name in ["n003_c.png", "n001_a.JPEG", "n002_b.jpg"]:
        _image(tmp_path / "images" / name)
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    dataset = LabelledImages(tmp_path / "images", SMALL)
    assert [p.name for p, _ in dataset.samples] == ["n001_a.JPEG", "n002_b.jpg", "n003_c.png"]
    assert _labels(dataset) == [0, 1, 2]
    image, label = dataset[1]
    assert image.shape == (3, 24, 24) and label == 1
    assert len(LabelledImages(tmp_path / "images", SMALL, limit=2)) == 2


def test_flat_folder_with_given_synsets(tmp_path):
    synsets = tmp_path / "lists" / "wnids.txt"
    synsets.parent.mkdir()
    synsets.write_text("n009\nn001\n")
    _image(tmp_path / "images" / "n001_x.jpg")
    assert _labels(LabelledImages(tmp_path / "images", SMALL, labels=synsets)) == [1]


def test_class_folders(tmp_path):
    for name in ["dog/2.jpg", "dog/1.jpg", "cat/1.png", "emu/1.jpg"]:
        _image(tmp_path / "root" / name)
    dataset = LabelledImages(tmp_path / "root", SMALL)
    assert [(p.parent.name, p.name, label) for p, label in dataset.samples] == [
        ("cat", "1.png", 0), ("dog", "1.jpg", 1), ("dog", "2.jpg", 1), ("emu", "1.jpg", 2)
    ]
    synsets = tmp_path / "synsets.txt"
    synsets.write_text("emu\ndog\ncat\n")
    assert _labels(LabelledImages(tmp_path / "root", SMALL, labels=synsets)) == [2, 1, 1, 0]


def test_image_label_file(tmp_path):
    for name in ["a.jpg", "b.jpg", "c d.jpg"]:
        _image(tmp_path / "val" / name)
    (tmp_path / "val" / "image_label.txt").write_text("b.jpg 7\n\na.jpg 3\nc d.jpg 0\n")
    dataset = LabelledImages(tmp_path / "val", SMALL)
    assert [(p.name, label) for p, label in dataset.samples] == [("b.jpg", 7), ("a.jpg", 3), ("c d.jpg", 0)]
    other = tmp_path / "labels.txt"
    other.write_text("a.jpg 5\n")
    assert _labels(LabelledImages(tmp_path / "val", SMALL, labels=other)) == [5]


def test_errors_name_the_path_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        LabelledImages(tmp_path / "missing", SMALL)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "synsets.txt").write_text("n001\n")
    with pytest.raises(FileNotFoundError, match="no images.*empty"):
        LabelledImages(tmp_path / "empty", SMALL)
    with pytest.raises(FileNotFoundError, match="nolist.txt"):
        LabelledImages(tmp_path / "empty", SMALL, labels=tmp_path / "nolist.txt")

    _image(tmp_path / "val" / "a.jpg")
    listing = tmp_path / "val" / "image_label.txt"
    listing.write_text("a.jpg 1\ngone.jpg 2\n")
    with pytest.raises(FileNotFoundError, match=r"image_label.txt:2.*gone.jpg"):
        LabelledImages(tmp_path / "val", SMALL)
    listing.write_text("a.jpg 1\n\na.jpg one\n")
    with pytest.raises(ValueError, match=r"image_label.txt:3"):
        LabelledImages(tmp_path / "val", SMALL)

    _image(tmp_path / "flat" / "n999_x.jpg")
    with pytest.raises(FileNotFoundError, match="synset list"):
        LabelledImages(tmp_path / "flat", SMALL)
    (tmp_path / "flat" / "synsets.txt").write_text("n001\n")
    with pytest.raises(ValueError, match=r"n999_x.jpg.*synsets.txt"):
        LabelledImages(tmp_path / "flat", SMALL)

    _image(tmp_path / "folders" / "n999" / "x.jpg")
    with pytest.raises(ValueError, match=r"n999.*synsets.txt"):
        LabelledImages(tmp_path / "folders", SMALL, labels=tmp_path / "flat" / "synsets.txt")


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_images_are_skipped_and_reported(tmp_path, workers):
    (tmp_path / "synsets.txt").write_text("n001\nn002\n")
    for name in ["n001_a.jpg", "n001_c.jpg", "n002_d.png", "n002_e.jpg"]:
        _image(tmp_path / "images" / name)
    corrupt = tmp_path / "images" / "n002_b.jpg"
    corrupt.write_bytes(b"\xff\xd8 not really a jpeg")
    truncated = tmp_path / "images" / "n002_f.jpg"
    truncated.write_bytes((tmp_path / "images" / "n001_a.jpg").read_bytes()[:200])
    loader = ImageLoader(LabelledImages(tmp_path / "images", SMALL), batch_size=2, workers=workers)
    with pytest.warns(UserWarning, match="skipped unreadable image") as caught:
        batches = list(loader)
    assert ["n002_b.jpg" in str(w.message) for w in caught] == [True, False]
    assert ["n002_f.jpg" in str(w.message) for w in caught] == [False, True]
    assert loader.skipped == [str(corrupt), str(truncated)]
    assert [labels.tolist() for _, labels in batches] == [[0, 0], [1], [1]]
    images, labels = batches[0]
    assert images.shape == (2, 3, 24, 24) and images.dtype == torch.float32 and labels.dtype == torch.int64


def test_sample_folder_labels():
    dataset = LabelledImages(SAMPLE_DIR / "images", SMALL)
    wnids = (SAMPLE_DIR / "synsets.txt").read_text().split()
    assert len(dataset) == 800
    assert all(wnids[label] == path.name.split("_")[0] for path, label in dataset.samples)


def test_topk_hits_and_accuracy():
    logits = np.array([
        [0.1, 0.9, 0.0, 0.0, 0.0, 0.0, 0.0],  # label 1: top-1
        [0.9, 0.1, 0.5, 0.4, 0.3, 0.2, 0.0],  # label 5: 5th highest, top-5 only
        [0.9, 0.1, 0.5, 0.4, 0.3, 0.2, 0.0],  # label 6: lowest, miss
    ])
    labels = np.array([1, 5, 6])
    assert topk_hits(logits, labels) == (1, 2)
    assert topk_hits(torch.tensor(logits), torch.tensor(labels), k=(1, 2, 7)) == (1, 1, 3)
    accuracy = Accuracy()
    accuracy.update(logits, labels)
    accuracy.update(torch.tensor(logits[:1]), torch.tensor(labels[:1]))
    assert accuracy.count == 4
    assert accuracy.top1 == pytest.approx(2 / 4) and accuracy.top5 == pytest.approx(3 / 4)
    with pytest.raises(ValueError):
        topk_hits(logits, labels[:2])


def test_top1_gap_is_paired_over_the_same_images():
    labels = np.array([0, 1, 2, 3])
    base = np.eye(4)[[0, 1, 0, 0]]    # right on images 0, 1
    model = np.eye(4)[[0, 0, 2, 3]]   # right on images 0, 2, 3
    gap = top1_gap(model, base, labels)
    d = np.array([0, -1, 1, 1])
    assert gap["gap"] == pytest.approx(25.0)
    assert gap["se"] == pytest.approx(100 * d.std(ddof=1) / 2)
    assert (gap["better"], gap["worse"]) == (2, 1)
    assert top1_gap(torch.tensor(model), torch.tensor(model), torch.tensor(labels)) == \
        {"gap": 0.0, "se": 0.0, "better": 0, "worse": 0}
    with pytest.raises(ValueError):
        top1_gap(model, base, labels[:, None])
    with pytest.raises(ValueError):
        top1_gap(model, base[:3], labels)
