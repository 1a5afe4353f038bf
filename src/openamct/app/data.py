"""Image data for calibration and evaluation, on PIL and numpy only (no torchvision).

Preprocessing is the usual resize-short-side, centre-crop, normalise pipeline done directly on PIL
images, so FP32 accuracies can be reproduced without depending on torchvision.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS  # PIL's cap (about 89 million pixels): larger files are skipped
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I")
_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


@dataclass(frozen=True)
class Preprocess:
    """Resize the short side, centre-crop a square, scale to [0, 1] and normalise per channel (RGB)."""

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"

    def __post_init__(self):
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}, got {self.interpolation!r}")

    def __call__(self, image: Image.Image) -> np.ndarray:
        """Return a float32 CHW array."""
        image = as_rgb(image)
        width, height = image.size
        # The long side is rounded and the crop offset floored: the rounding the sample accuracies in
        # shared/data/imagenet-sample were measured with (torchvision's truncation moves a few images).
        long = round(self.resize * max(width, height) / min(width, height))
        size = (self.resize, long) if width <= height else (long, self.resize)
        image = image.resize(size, _RESAMPLE[self.interpolation])
        left = (size[0] - self.crop) // 2
        top = (size[1] - self.crop) // 2
        image = image.crop((left, top, left + self.crop, top + self.crop))
        return _normalised(image, self.mean, self.std)

    def augment(self, scale: tuple[float, float] = (0.08, 1.0), seed: int | None = None) -> Augment:
        """The training preprocessing that goes with this one (same crop size, normalisation, interpolation)."""
        return Augment(self.crop, self.mean, self.std, self.interpolation, scale, seed)


def as_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any mode PIL decodes: gray, palette, RGBA, CMYK as PIL converts them; 16-bit gray scaled to
    8 bits (PIL's own conversion would clip it to white)."""
    if image.mode in _SIXTEEN_BIT:
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8))
    return image.convert("RGB")


def _normalised(image: Image.Image, mean, std) -> np.ndarray:
    """A float32 CHW array, scaled to [0, 1] then normalised per channel."""
    array = np.asarray(image, dtype=np.float32) / np.float32(255)
    array = (array - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


@dataclass(frozen=True)
class Augment:
    """Training preprocessing: a crop of random area (a `scale` fraction of the image) and aspect ratio (3/4..4/3)
    resized to `crop`, then a random horizontal flip (torchvision's RandomResizedCrop + RandomHorizontalFlip).

    Without a `seed` it draws from torch's global generator (repeatable under `torch.manual_seed` and DataLoader's
    per-worker seeds). With one, LabelledImages draws each item's augmentation from (seed, epoch, index), as the
    EpochSampler numbers items: a run then sees the same images whatever the workers, and a resumed run
    continues exactly where it stopped."""

    crop: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    scale: tuple[float, float] = (0.08, 1.0)
    seed: int | None = None

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> np.ndarray:
        image = as_rgb(image)
        width, height = image.size
        box = None
        for _ in range(10):
            area = width * height * float(torch.empty(1).uniform_(*self.scale, generator=generator))
            log_ratio = torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)
            aspect = math.exp(float(log_ratio))
            w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < w <= width and 0 < h <= height:
                left = int(torch.randint(0, width - w + 1, (), generator=generator))
                top = int(torch.randint(0, height - h + 1, (), generator=generator))
                box = (left, top, left + w, top + h)
                break
        if box is None:  # fall back to the centre square
            side = min(width, height)
            box = ((width - side) // 2, (height - side) // 2, (width + side) // 2, (height + side) // 2)
        image = image.resize((self.crop, self.crop), _RESAMPLE[self.interpolation], box=box)
        if float(torch.rand((), generator=generator)) < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return _normalised(image, self.mean, self.std)


class LabelledImages(Dataset):
    """Labelled images from a folder, in a fixed order, for calibration and evaluation.

    Layouts, chosen from what is on disk:

    * an AMCT ``image_label.txt`` ("<file name> <class id>" per line; file order is evaluation order),
      passed as ``labels`` or found at ``root/image_label.txt``;
    * class sub-folders (ImageFolder): classes sorted, index = position, or the sub-folder name looked
      up in a synset list when there is one;
    * a flat folder of ``<wnid>_<anything>.JPEG|jpg|png`` files with a synset list (one wnid per line,
      index = 0-based line number), passed as ``labels`` or found at ``root/synsets.txt`` or
      ``root/../synsets.txt``.

    A label file is read as an image list when its first entry names an image file, else as a synset
    list. Files are sorted by name except for image lists; ``limit`` keeps the first N.
    Items are ``(float32 CHW array, class index)``. An image file that declares more than ``max_pixels`` pixels is
    refused before it is decoded (a "decompression bomb" would take the memory of a whole run).
    """

    def __init__(self, root, preprocess: Preprocess, labels=None, limit: int | None = None,
                 max_pixels: int = MAX_IMAGE_PIXELS):
        self.root = Path(root)
        self.preprocess = preprocess
        self.max_pixels = max_pixels
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        label_file = Path(labels) if labels is not None else _find_label_file(self.root)
        if label_file is not None and not label_file.is_file():
            raise FileNotFoundError(f"label file not found: {label_file}")
        if label_file is not None and _is_image_list(label_file):
            samples = _listed_images(self.root, label_file)
        else:
            synsets = _read_synsets(label_file) if label_file is not None else None
            classes = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
            if classes:
                samples = _class_folders(classes, synsets, label_file)
            else:
                samples = _flat_folder(self.root, synsets, label_file)
        if not samples:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {self.root}")
        self.samples: list[tuple[Path, int]] = samples[:limit]

    def __len__(self) -> int:
        return len(self.samples)

    def subset(self, start: int = 0, stop: int | None = None, preprocess: Preprocess | None = None):
        """The images start..stop of this set (e.g. a train/eval split), optionally with other preprocessing."""
        part = copy.copy(self)
        part.samples = self.samples[start:stop]
        part.preprocess = preprocess or self.preprocess
        return part

    def __getitem__(self, item: int) -> tuple[np.ndarray, int]:
        """Item `item` is image `item % len(self)`; a larger `item` (EpochSampler's epoch * len(self) + index) also
        seeds a seeded augmentation."""
        path, label = self.samples[item % len(self.samples)]
        Image.MAX_IMAGE_PIXELS = self.max_pixels  # PIL's own check, in whichever process decodes
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if isinstance(self.preprocess, Augment) and self.preprocess.seed is not None:
                    generator = torch.Generator().manual_seed((self.preprocess.seed << 32) + item)
                    return self.preprocess(image, generator), label
                return self.preprocess(image), label


def _find_label_file(root: Path) -> Path | None:
    for candidate in (root / "image_label.txt", root / "synsets.txt", root.parent / "synsets.txt"):
        if candidate.is_file():
            return candidate
    return None


def _entries(path: Path):
    """(line number, stripped line) for the non-blank lines of a label file."""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            yield number, line.strip()


def _is_image_list(path: Path) -> bool:
    for _, line in _entries(path):
        return Path(line.rsplit(maxsplit=1)[0]).suffix.lower() in IMAGE_SUFFIXES
    return False


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _read_synsets(path: Path) -> dict[str, int]:
    synsets: dict[str, int] = {}
    for index, (_, line) in enumerate(_entries(path)):
        synsets.setdefault(line.split()[0], index)
    return synsets


def _listed_images(root: Path, label_file: Path) -> list[tuple[Path, int]]:
    samples = []
    for number, line in _entries(label_file):
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].isdigit():
            raise ValueError(f"{label_file}:{number}: expected '<image file> <class id>', got {line!r}")
        path = root / parts[0]
        if not path.is_file():
            raise FileNotFoundError(f"{label_file}:{number}: image not found: {path}")
        samples.append((path, int(parts[1])))
    return samples


def _class_folders(classes: list[Path], synsets: dict[str, int] | None, label_file) -> list[tuple[Path, int]]:
    samples = []
    for index, folder in enumerate(classes):
        if synsets is not None:
            if folder.name not in synsets:
                raise ValueError(f"class folder {folder}: {folder.name!r} is not in the synset list {label_file}")
            index = synsets[folder.name]
        samples += [(path, index) for path in _images(folder)]
    return samples


def _flat_folder(root: Path, synsets: dict[str, int] | None, label_file) -> list[tuple[Path, int]]:
    if synsets is None:
        raise FileNotFoundError(
            f"{root}: a flat image folder needs a synset list; pass labels=PATH "
            f"or put synsets.txt in {root} or {root.parent}"
        )
    samples = []
    for path in _images(root):
        wnid = path.name.split("_", 1)[0]
        if wnid not in synsets:
            raise ValueError(f"{path}: wnid {wnid!r} is not in the synset list {label_file}")
        samples.append((path, synsets[wnid]))
    return samples


class _Tolerant(Dataset):
    """Turns a decoding failure into a marker, in the worker, so one bad file does not end the run."""

    def __init__(self, images: LabelledImages):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        path = str(self.images.samples[index % len(self.images.samples)][0])
        try:
            image, label = self.images[index]
        except (OSError, SyntaxError, ValueError) as err:
            return path, None, -1, f"{type(err).__name__}: {err}"
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            return path, None, -1, f"{err} (the cap on decoded pixels; --max-image-pixels raises it)"
        return path, image, label, None


def _collate(items):
    """Stack the decoded items; pass the failed ones on so the main process can report them."""
    good = [(image, label) for _, image, label, _ in items if image is not None]
    failed = [(path, error) for path, image, _, error in items if image is None]
    images = torch.from_numpy(np.stack([image for image, _ in good])) if good else torch.empty(0)
    labels = torch.tensor([label for _, label in good], dtype=torch.int64)
    return images, labels, failed


class EpochSampler(Sampler):
    """The training order: a permutation of the `size` items per epoch, drawn from (seed, epoch), and this rank's
    share of it under DDP (every rank the same count). Each index is yielded as epoch * size + index, so that
    LabelledImages can seed the item's augmentation by epoch and index: the batches depend on the seed alone, not
    on the workers or on where a run was resumed."""

    def __init__(self, size: int, seed: int = 0, rank: int = 0, world: int = 1):
        self.size, self.seed, self.rank, self.world = size, seed, rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.size / self.world)

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        order += order[:len(self) * self.world - self.size]  # padded so that every rank gets as many
        return iter([self.epoch * self.size + index for index in order[self.rank::self.world]])


class ImageLoader:
    """Batches ``(float32 NCHW tensor, int64 labels)`` of a LabelledImages, in file order unless shuffled or
    sampled (training: ``shuffle=True``, or a DistributedSampler under DDP).

    Images are decoded in ``workers`` processes when workers > 0. Unreadable images are skipped with a
    warning; after a pass, ``skipped`` lists their paths.
    """

    def __init__(self, dataset: LabelledImages, batch_size: int, workers: int = 0, shuffle: bool = False,
                 sampler=None, drop_last: bool = False):
        self.dataset = dataset
        self.skipped: list[str] = []
        # an EpochSampler's loader draws its worker seeds from its own generator, not torch's global one, which a
        # resumed run restores for what the model draws (dropout)
        generator = torch.Generator().manual_seed(0) if isinstance(sampler, EpochSampler) else None
        self._loader = DataLoader(
            _Tolerant(dataset), batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
            num_workers=workers, collate_fn=_collate, drop_last=drop_last, persistent_workers=workers > 0,
            generator=generator
        )

    def __len__(self) -> int:
        return len(self._loader)

    def set_epoch(self, epoch: int) -> None:
        """A new shuffle for each epoch under a DistributedSampler (as its docs require)."""
        if hasattr(self._loader.sampler, "set_epoch"):
            self._loader.sampler.set_epoch(epoch)

    def __iter__(self):
        self.skipped = []
        for images, labels, failed in self._loader:
            for path, error in failed:
                warnings.warn(f"skipped unreadable image {path} ({error})", stacklevel=2)
                self.skipped.append(path)
            if len(labels):
                yield images, labels


def _numpy(array) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def _logits_and_labels(logits, labels) -> tuple[np.ndarray, np.ndarray]:
    """Both as numpy, checked to be (N, classes) and (N,): a label column (N, 1) would otherwise broadcast."""
    logits, labels = _numpy(logits), _numpy(labels)
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"expected logits (N, classes) and labels (N,), got {logits.shape} and {labels.shape}")
    return logits, labels


def topk_hits(logits, labels, k=(1, 5)) -> tuple[int, ...]:
    """How many rows have their label among the k highest logits, for each k (numpy or torch input)."""
    logits, labels = _logits_and_labels(logits, labels)
    ranked = np.argsort(-logits, axis=1, kind="stable")[:, : max(k)]
    hits = ranked == labels[:, None]
    return tuple(int(hits[:, :n].any(axis=1).sum()) for n in k)


def top1_gap(logits, base, labels) -> dict:
    """Top-1 of `logits` minus top-1 of `base` (points), paired over the same images, with its standard error and
    the counts of images only one of them gets right: on a few hundred images a gap of one or two images is within
    the noise, and the standard error says how far."""
    (logits, labels), (base, _) = _logits_and_labels(logits, labels), _logits_and_labels(base, labels)
    d = (logits.argmax(1) == labels).astype(np.float64) - (base.argmax(1) == labels)
    return {"gap": float(100 * d.mean()), "se": float(100 * d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0,
            "better": int((d > 0).sum()), "worse": int((d < 0).sum())}


class Accuracy:
    """Running top-1/top-5 accuracy of any predictor's logits (torch or numpy, e.g. ONNX Runtime)."""

    def __init__(self):
        self.count = 0
        self.hits1 = 0
        self.hits5 = 0

    def update(self, logits, labels) -> None:
        hits1, hits5 = topk_hits(logits, labels)
        self.hits1 += hits1
        self.hits5 += hits5
        self.count += len(labels)

    @property
    def top1(self) -> float:
        return self.hits1 / self.count if self.count else 0.0

    @property
    def top5(self) -> float:
        return self.hits5 / self.count if self.count else 0.0
