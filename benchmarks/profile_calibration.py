"""Where calibration spends its time: EfficientNet-Lite0 through the AMCT calls (default W8A8) under cProfile, with
the wall time of each phase and the cumulative time of openamct's functions.

Run by hand, e.g. ``python benchmarks/profile_calibration.py --batches 2``.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import openamct as amct  # noqa: E402
from openamct.app.data import ImageLoader, LabelledImages  # noqa: E402
from openamct.app.models import MODELS  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "imagenet-sample")
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--top", type=int, default=40, help="functions listed")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("AMCT_LOG_LEVEL", "warning")
    spec = MODELS["efficientnet_lite0"]
    dataset = LabelledImages(args.data / "images", spec.preprocess, labels=args.data / "synsets.txt",
                             limit=args.batches * args.batch_size)
    batches = [images for images, _ in ImageLoader(dataset, args.batch_size, workers=2)]
    model, x = spec.build(None), batches[0][:1]
    os.chdir(tempfile.mkdtemp(prefix="openamct-profile-"))
    profile = cProfile.Profile()
    marks = [time.perf_counter()]
    profile.enable()
    amct.create_quant_config("config.json", model, x, batch_num=len(batches))
    calibration = amct.quantize_model("config.json", "modified_model.onnx", "record.txt", model, x)
    marks.append(time.perf_counter())
    with torch.no_grad():
        for images in batches:
            calibration(images)
    marks.append(time.perf_counter())
    amct.save_model("modified_model.onnx", "record.txt", "lite0")
    marks.append(time.perf_counter())
    profile.disable()
    phases = ("create_quant_config + quantize_model", f"{len(batches)} calibration batches (convert included)",
              "save_model")
    for phase, start, end in zip(phases, marks, marks[1:]):
        print(f"{phase}: {end - start:.1f} s")
    pstats.Stats(profile).sort_stats("cumulative").print_stats(r"openamct|unfold|topk|conv2d", args.top)


if __name__ == "__main__":
    main()
