"""`openamct retrain`: AMCT's QAT flow (create_quant_retrain_config -> create_quant_retrain_model, started from a PTQ
calibration -> training -> save_quant_retrain_model), single process or DDP under torchrun, then the FP32 model,
the QAT model and its deploy ONNX model evaluated on the held-out images."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ... import amct
from ...amct.config_files import load_retrain_json, retrain_cfg
from ...core import qat
from ...core.capture import capture, group_members
from ...core.config import LAYER_GROUPS
from ...core.fileio import atomic_path, write_text
from ...onnx_export.parity import describe
from .. import training
from ..data import EpochSampler, ImageLoader
from ..evaluation import OnnxPredictor, TorchPredictor, evaluate
from . import common

SUMMARY = "quantization-aware training: train the quantized model, export it, compare accuracies"
DESCRIPTION = """\
Train a model quantized (AMCT's QAT flow) and compare its accuracy before and after.

Steps: create_quant_retrain_config (from --config, else ULQ activations and --weight-bits weights)
-> create_quant_retrain_model, started from a PTQ calibration by default -> --steps training steps
on the first --train images (distillation from the FP32 model by default) -> save_quant_retrain_model
-> evaluation of the FP32 model, the QAT model and its deploy ONNX model on the other images.

Multi-process: torchrun --nproc_per_node N $(which openamct) retrain ... (gloo on CPU, nccl with
--device cuda; --batch-size is per process, only rank 0 writes files)."""


EPILOG = """\
outputs (OUTPUT: --output, else outputs/NAME_retrain):
  OUTPUT/tmp/retrain.cfg                the QAT simple config used (--config, or the generated one)
  OUTPUT/tmp/config.json                per-layer QAT config (create_quant_retrain_config)
  OUTPUT/tmp/record.txt                 scales and offsets of every quantized layer
  OUTPUT/tmp/checkpoint.pth             {'state_dict': ...} for restore_quant_retrain_model
  OUTPUT/NAME_deploy_model.onnx         INT8 QDQ model for deployment
  OUTPUT/NAME_fake_quant_model.onnx     float model simulating it
  OUTPUT/retrain_report.json            accuracies, losses, parity, paths and timings

example:
  openamct retrain --model efficientnet_lite0 --images data/images --labels data/synsets.txt \\
      --train 600 --weight-bits 4 --steps 150"""


def add_parser(commands) -> None:
    retrain = common.add_command(commands, "retrain", SUMMARY, DESCRIPTION, EPILOG)
    common.model_arguments(retrain, onnx=False)
    retrain.add_argument("--name", metavar="NAME", help="prefix of the exported files (default: the model name)")
    common.data_arguments(retrain, eval_help="evaluate on at most N of the held-out images (default: all of them)",
                    eval_min=0)
    train = retrain.add_argument_group("training")
    train.add_argument("--train", type=common.positive, metavar="N",
                       help="the first N images train, the rest evaluate (default: three quarters)")
    train.add_argument("--output", metavar="DIR", help="output folder (default outputs/NAME_retrain)")
    train.add_argument("--config", metavar="FILE.cfg",
                       help="AMCT QAT simple config (protobuf text of retrain_config_pytorch.proto)")
    train.add_argument("--weight-bits", type=int, choices=(4, 8),
                       help="without --config: INT8 weights (arq_retrain) or INT4 (ulq_retrain); default 8")
    train.add_argument("--int8-layers", type=common.layer_group_list, metavar="GROUPS",
                       help="without --config, with --weight-bits 4: comma list of layer groups whose weights stay "
                            f"INT8 ({', '.join(LAYER_GROUPS)}: the stem conv, the depthwise convs)")
    train.add_argument("--batch-num", type=common.positive, default=2, metavar="N",
                       help="without --config: batches that initialise the activation ranges (IFMR); default 2")
    train.add_argument("--init", choices=("ptq", "ifmr"), default="ptq",
                       help="start from a PTQ calibration (GPTQ, bias correction) on the first --batch-num x "
                            "--batch-size training images (default), or from the float weights with IFMR ranges")
    train.add_argument("--steps", type=common.positive, default=60, metavar="N", help="training steps (default 60)")
    train.add_argument("--lr", type=float, default=5e-5, help="Adam learning rate of the weights (default 5e-5)")
    train.add_argument("--quant-lr", type=float, default=1e-4,
                       help="Adam learning rate of the quantizers' ranges and scales (default 1e-4; 1e-3 moves "
                            "4-bit weight scales too far)")
    train.add_argument("--kd-weight", type=float, default=1.0,
                       help="weight of distillation from the FP32 model against the labels' cross-entropy: 1 = "
                            "distillation only (default), 0 = labels only")
    train.add_argument("--mixup", type=common.non_negative_float, default=0.0, metavar="ALPHA",
                       help="train on each batch blended with its reverse, weight ~ Beta(ALPHA, ALPHA): the teacher "
                            "labels the blends, which helps long runs on few images (1.0 with 600 steps or more; "
                            "default 0, off)")
    train.add_argument("--seed", type=int, default=0, help="seed of the shuffling, augmentation and mixup (default 0)")
    train.add_argument("--checkpoint-every", type=common.non_negative, default=25, metavar="N",
                       help="write OUTPUT/tmp/resume.pth every N steps (0: never; default 25)")
    train.add_argument("--resume", action="store_true",
                       help="continue a run that stopped from OUTPUT/tmp/resume.pth, with the same options: the result "
                            "is the one the uninterrupted run gives")
    common.device_argument(retrain)
    retrain.set_defaults(func=run)


# the options a resumed run must share with the run it continues
RESUMABLE = ("steps", "batch_size", "lr", "quant_lr", "kd_weight", "mixup", "seed", "init", "config", "weight_bits",
             "int8_layers", "batch_num")


def _resumed(path: Path, options: dict, qmodel, optimizer, scheduler) -> dict:
    """The training state of `path`, with the model, optimizer and scheduler restored from it; a checkpoint of
    other options or another model is refused."""
    if not path.is_file():
        raise common.UsageError(f"--resume: no checkpoint at {path} (the run wrote none before it stopped)")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    differ = {key: (saved["options"].get(key), value) for key, value in options.items()
              if saved["options"].get(key) != value}
    if differ:
        raise common.UsageError(f"--resume: {path} was written with other options: " + ", ".join(
            f"{key} {old!r} (now {new!r})" for key, (old, new) in differ.items()))
    try:
        qmodel.load_state_dict(saved["model"])
    except RuntimeError as err:
        raise common.UsageError(f"--resume: {path} does not fit this model: {common.one_line(err)}") from None
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    return saved["training"]


def _distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size): from torchrun's environment, with the process group initialised; (0, 1) without."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world


def run(args) -> int:
    start = time.perf_counter()
    timings = {}
    if args.config and not os.path.isfile(args.config):
        raise common.UsageError(f"--config: file not found: {args.config}")
    if args.config and (args.weight_bits is not None or args.int8_layers is not None):
        raise common.UsageError("--weight-bits and --int8-layers cannot be combined with --config: set the weights' "
                                "dst_type and per-layer overrides in the .cfg")
    weight_bits, int8_layers = args.weight_bits or 8, args.int8_layers or []
    device = common.device(args.device)
    rank, world = _distributed(device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    preprocess_name = common.preprocess_name(args)
    preprocess = common.preprocessing(preprocess_name)
    dataset = common.dataset(args, preprocess)
    n_train = args.train or len(dataset) * 3 // 4
    if n_train >= len(dataset) or n_train < args.batch_size:
        raise common.UsageError(f"--train {n_train}: {args.images} has {len(dataset)} images; training needs at least "
                         f"--batch-size {args.batch_size} of them and evaluation at least one")
    with common.timed(timings, "load_model"):
        model, model_name, input_shape = common.load_model(args)
    name = args.name or model_name
    output = Path(args.output or Path("outputs") / f"{name}_retrain")
    tmp = output / "tmp"
    if rank == 0:
        common.check_output_folder(tmp, model)
    cfg, config_file, record_file = tmp / "retrain.cfg", tmp / "config.json", tmp / "record.txt"
    model.to(device)
    input_data = torch.randn(input_shape, generator=torch.Generator().manual_seed(0)).to(device)
    torch.manual_seed(args.seed)

    if rank == 0:
        if not args.config:
            int8 = group_members(capture(model, input_data), int8_layers) if weight_bits < 8 else []
            text = retrain_cfg(args.batch_num, weight_bits, int8)
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
        with common.timed(timings, "ptq_init"):
            qat.start_from_ptq(qmodel, model, load_retrain_json(str(config_file)),
                                   lambda m: [m(images.to(device)) for images, _ in calibration], input_data,
                                   batch_num=len(calibration))
    trained = qmodel
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        trained = torch.nn.parallel.DistributedDataParallel(qmodel, device_ids=ids)
    train_set = dataset.subset(0, n_train, preprocess.augment(scale=(0.25, 1.0), seed=args.seed))
    sampler = EpochSampler(n_train, args.seed, rank, world)
    loader = ImageLoader(train_set, args.batch_size, args.workers, sampler=sampler, drop_last=True)
    groups = qat.parameter_groups(qmodel, weight_decay=0.0)
    groups[0]["lr"], groups[1]["lr"] = args.lr, args.quant_lr
    optimizer = torch.optim.Adam(groups)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)
    run_options = {key: getattr(args, key) for key in RESUMABLE} | {"world_size": world, "train_images": n_train}
    resume = _resumed(tmp / "resume.pth", run_options, qmodel, optimizer, scheduler) if args.resume else None

    def checkpoint(state):
        if rank == 0:
            with atomic_path(str(tmp / "resume.pth")) as path:
                torch.save({"options": run_options, "training": state, "model": qmodel.state_dict(),
                            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, path)

    with common.timed(timings, "training"):
        losses = training.train(trained, loader, args.steps, optimizer, scheduler=scheduler,
                                teacher=model if args.kd_weight > 0 else None, kd_weight=args.kd_weight,
                                mixup=args.mixup, seed=args.seed, device=device, resume=resume,
                                checkpoint=checkpoint, checkpoint_every=args.checkpoint_every)
    if rank == 0:  # saves, evaluates and reports while the other ranks wait at the barrier below
        qmodel.eval()
        with common.timed(timings, "save_model"):
            torch.save({"state_dict": qmodel.state_dict()}, tmp / "checkpoint.pth")
            qmodel.cpu()  # the parity check runs on CPU tensors
            saved = amct.save_quant_retrain_model(
                str(config_file), qmodel, str(record_file), str(output / name), input_data.cpu(),
                input_names=["input"], output_names=["output"],
                dynamic_axes={"input": {0: "batch_size"}, "output": {0: "batch_size"}})
            qmodel.to(device)
        evaluation = dataset.subset(n_train, n_train + args.eval if args.eval else None)
        predictors = {"fp32": TorchPredictor(model, device), "qat": TorchPredictor(qmodel, device),
                      "deploy": OnnxPredictor(saved["paths"]["deploy"], args.threads or 0)}
        with common.timed(timings, "evaluation"):
            accuracy, _, top1, skipped = evaluate(predictors, evaluation, args.batch_size, args.workers,
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
        write_text(str(output / "retrain_report.json"), json.dumps(common.json_safe(report), indent=2) + "\n")
        print(f"\n{name}: QAT with {cfg} on {n_train} images, {args.steps} steps x {args.batch_size} x {world} "
              f"process(es), {timings['training']:.0f} s; final loss {np.mean(losses[-10:]):.4f}")
        print(f"\nAccuracy on {report['eval_images']} held-out images:")
        for key, label in (("fp32", "FP32 (PyTorch)"), ("qat", "QAT model (PyTorch)"), ("deploy", "QAT deploy (ORT)")):
            acc = accuracy[key]
            print(f"  {label:<22}{100 * acc.top1:>7.2f}%{100 * acc.top5:>8.2f}%")
        print(f"  deploy and QAT model agree on the top-1 class of {100 * report['deploy_qat_top1_agreement']:.1f}% "
              f"of the images")
        for kind, result in saved["parity"].items():
            print(f"  parity of the {describe(kind, result)}")
        print("\nOutputs:")
        for key, path in saved["paths"].items():
            print(f"  {key:<12} {os.path.abspath(path)}")
        print(f"  {'report':<12} {os.path.abspath(output / 'retrain_report.json')}")
        print(f"Total time: {timings['total']:.1f} s")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0
