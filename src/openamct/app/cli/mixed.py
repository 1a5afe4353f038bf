"""`openamct calibrate --max-drop POINTS | --size-budget RATIO`: mixed precision (core/mixed_precision.py) in place
of the AMCT flow's one config. Calibration uses the usual first batch_num x batch_size images; the search scores
each configuration it tries (the PyTorch simulation's top-1) on the --search-images images after them, so the
final evaluation of the chosen model is fairest on the images after those."""
from __future__ import annotations

import dataclasses

import torch

from ...amct.config_files import save_json
from ...amct.record import write_record
from ...core.api import records
from ...core.config import ConfigError
from ...core.fileio import write_bytes
from ...core.mixed_precision import mixed_precision, parse_option
from ...onnx_export import export
from ...onnx_export.fused import fused_model
from ..data import ImageLoader
from ..evaluation import TorchPredictor, logits
from . import common


def add_arguments(group) -> None:
    group.add_argument("--max-drop", type=float, metavar="POINTS",
                       help="mixed precision: each layer's weight format (from --weight-bits, or float) chosen for "
                            "the smallest weights whose top-1 on the search images stays within POINTS of FP32's")
    group.add_argument("--size-budget", type=float, metavar="RATIO",
                       help="mixed precision: the formats of least predicted loss with weights of at most RATIO "
                            "times their INT8 bytes (e.g. 0.6)")
    group.add_argument("--weight-bits", default="4,8", metavar="F,F",
                       help="the formats mixed precision chooses from: 4, 6, 7, 8 (bits) and nuqN (N-level NUQ "
                            "codebooks); float is always one (default 4,8)")
    group.add_argument("--search-images", type=common.positive, default=256, metavar="N",
                       help="mixed precision: images after the calibration ones that each configuration is scored "
                            "on (default 256)")


def requested(args) -> bool:
    return args.max_drop is not None or args.size_budget is not None


def check(args) -> list:
    """The formats, checked, with the other mixed-precision arguments; UsageErrors name the option."""
    if args.max_drop is not None and args.size_budget is not None:
        raise common.UsageError("give --max-drop or --size-budget, not both")
    if args.max_drop is not None and args.max_drop < 0:
        raise common.UsageError(f"--max-drop: got {args.max_drop}, expected top-1 points >= 0")
    if args.block_reconstruction:
        raise common.UsageError("--block-reconstruction cannot be combined with --max-drop or --size-budget yet")
    try:
        return [parse_option(option) for option in args.weight_bits.split(",") if option.strip()]
    except ConfigError as e:
        raise common.UsageError(f"--weight-bits: {e}") from None


def _decoded(dataset, batch_size: int, workers: int, skipped: list):
    """The dataset's image batches and all its labels, decoded once (each configuration tried reuses them)."""
    images, labels = [], []
    loader = ImageLoader(dataset, batch_size, workers)
    for x, y in loader:
        images.append(x)
        labels.append(y)
    skipped += [path for path in loader.skipped if path not in skipped]
    return images, torch.cat(labels).numpy() if labels else None


def search(args, formats, model, config, dataset, calibrated: int, device, input_data):
    """Run the search; returns the chosen calibrated model, its config and the search's summary for the report."""
    search_set = dataset.subset(calibrated, calibrated + args.search_images)
    if len(search_set) == 0:
        raise common.UsageError(f"mixed precision scores configurations on the images after the {calibrated} "
                                f"calibration ones, and {args.images} has no more: add images or lower --batch-num")
    skipped = []
    batches, _ = _decoded(dataset.subset(0, calibrated), args.batch_size, args.workers, skipped)
    batches = batches[:config.batch_num]
    images, labels = _decoded(search_set, args.batch_size, args.workers, skipped)
    images = torch.cat(images)

    def calibrate_fn(qmodel):
        for batch in batches:
            qmodel(batch.to(device))

    def evaluate_fn(candidate):
        scores = logits(TorchPredictor(candidate, device), images, args.batch_size)
        return 100 * float((scores.argmax(1) == labels).mean())

    try:
        result = mixed_precision(model, input_data, calibrate_fn, evaluate_fn, max_drop=args.max_drop,
                                 size_budget=args.size_budget, options=formats, base_config=config)
    except ConfigError as e:
        raise common.UsageError(str(e)) from None
    target = (f"top-1 within {args.max_drop} points of FP32 on {len(images)} search images"
              if args.max_drop is not None else f"weights at most {args.size_budget} of INT8")
    if result.qmodel is None:
        raise common.UsageError(f"mixed precision: no quantized configuration keeps {target}; only the float model "
                                f"does. Raise --max-drop or add formats to --weight-bits")
    chosen = next(t for t in result.trials if t.label == result.chosen)
    summary = {"target": target, "formats": formats, "search_images": len(images), "chosen": chosen.label,
               "size": chosen.size,
               "choice": result.choice, "trials": [dataclasses.asdict(t) for t in result.trials],
               "sensitivity": result.losses, "skipped_images": skipped}
    return result.qmodel, result.config, summary


def save(qmodel, config, paths: dict, save_path: str, sample, io: dict) -> dict:
    """The AMCT flow's files for the chosen model (config.json, record, fused model) and its exported models."""
    save_json(config, paths["config"])
    write_record(paths["record"], records(qmodel))
    fused, _ = fused_model(qmodel, sample, **io)
    write_bytes(paths["modified_model"], fused.SerializeToString())
    return export(qmodel, save_path, sample, **io)
