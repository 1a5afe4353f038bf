"""`openamct evaluate`: top-1/top-5 of an FP32 PyTorch model or of an ONNX model (ONNX Runtime, CPU)."""
from __future__ import annotations

import os
import time
from pathlib import Path

from ..evaluation import OnnxPredictor, TorchPredictor, evaluate
from . import common

SUMMARY = "top-1/top-5 accuracy of an FP32 model or of an exported ONNX model"
DESCRIPTION = """\
Print the top-1/top-5 accuracy of a PyTorch model (FP32) or of an ONNX model on labelled images."""


EPILOG = """\
examples:
  openamct evaluate --model efficientnet_lite0 --images data/images --labels data/synsets.txt
  openamct evaluate --onnx outputs/efficientnet_lite0/efficientnet_lite0_deploy_model.onnx \\
      --images data/images --labels data/synsets.txt"""


def add_parser(commands) -> None:
    evaluate = common.add_command(commands, "evaluate", SUMMARY, DESCRIPTION, EPILOG)
    common.model_arguments(evaluate, onnx=True)
    common.data_arguments(evaluate, eval_help="evaluate on the first N images (default: all images)", eval_min=1)
    common.device_argument(evaluate)
    evaluate.set_defaults(func=run)


def run(args) -> int:
    start = time.perf_counter()
    if args.onnx and args.weights:
        raise common.UsageError("--weights applies to --model/--model-file, not to --onnx")
    preprocess_name = common.preprocess_name(args)
    dataset = common.dataset(args, common.preprocessing(preprocess_name))
    if args.eval:
        dataset = dataset.subset(0, args.eval)
    if args.onnx:
        if not os.path.isfile(args.onnx):
            raise common.UsageError(f"--onnx: file not found: {args.onnx}")
        try:
            predictor = OnnxPredictor(args.onnx, args.threads or 0)
        except Exception as err:  # ONNX Runtime raises its own exception types for unreadable models
            raise common.UsageError(f"cannot load ONNX model {args.onnx}: {common.one_line(err)}") from None
        name, label = Path(args.onnx).name, "ONNX Runtime, CPU"
    else:
        device = common.device(args.device)
        model, name, _ = common.load_model(args)
        predictor, label = TorchPredictor(model.to(device), device), f"FP32 PyTorch, {device}"
    accuracy, _, _, skipped = evaluate({name: predictor}, dataset, args.batch_size, args.workers,
                                        f"evaluating {name}")
    acc = accuracy[name]
    print(f"{name} ({label}, preprocessing {preprocess_name}): top-1 {100 * acc.top1:.2f}%  "
          f"top-5 {100 * acc.top5:.2f}%  on {acc.count} images")
    print(f"Skipped images: {len(skipped)}")
    for path in skipped[:10]:
        print(f"  {path}")
    print(f"Total time: {time.perf_counter() - start:.1f} s")
    return 0
