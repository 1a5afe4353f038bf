"""QAT benchmark: EfficientNet-Lite0 trained quantized on 600 sample images, evaluated on the other 200.

Run by hand (not in CI), e.g. ``python benchmarks/qat.py --out /tmp/qatbench --bits 4,8``.
For each weight bit width it reports top-1/top-5 on the 200 held-out images, top-1 agreement with FP32 and the
top-1 gap to FP32 with its standard error (paired over the 200 images) for:
- PTQ with AMCT's ARQ (nearest rounding, no bias correction) and with openamct's default (GPTQ + bias correction),
  calibrated on the first 256 training images;
- QAT through the AMCT calls (create_quant_retrain_config/model, training, save_quant_retrain_model), with the
  exported deploy ONNX model evaluated in ONNX Runtime.
``--world-size 2`` trains with DistributedDataParallel over 2 processes (gloo on CPU, nccl on GPUs, one GPU each),
each with half the batch. ``--device cuda`` runs calibration, training and the PyTorch evaluations on the GPU.
``--eval-every N`` evaluates the QAT model on the held-out images every N steps (the learning curve).
``--int8 first,depthwise`` keeps the stem conv and the depthwise convs (4 % of EfficientNet-Lite0's weights, and
most of its 4-bit loss) at 8 bits: the ``stem_depthwise_int8`` rule in PTQ, one retrain.cfg
``override_layer_configs`` entry per layer in QAT.

Each of the 800 images is of a different class, so the 200 evaluation classes never occur in training: the default
loss is pure distillation from the FP32 model (``--kd-weight 1``), which teaches all 1000 classes, where the
labels alone would teach the model to prefer the 600 training classes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import openamct as amct  # noqa: E402
from openamct.amct.config_files import load_retrain_json, retrain_cfg  # noqa: E402
from openamct.app import training  # noqa: E402
from openamct.app.data import Accuracy, EpochSampler, ImageLoader, LabelledImages, top1_gap  # noqa: E402
from openamct.app.evaluation import OnnxPredictor, TorchPredictor, logits  # noqa: E402
from openamct.app.models import MODELS  # noqa: E402
from openamct.core import qat  # noqa: E402
from openamct.core.capture import capture, group_members  # noqa: E402
from openamct.core.config import LAYER_GROUPS, Rule  # noqa: E402
from openamct.onnx_export.parity import session  # noqa: E402

MODEL = "efficientnet_lite0"
IO = dict(input_names=["input"], output_names=["output"],
          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})


def example(model) -> torch.Tensor:
    return torch.zeros(1, 3, 224, 224, device=next(model.parameters()).device)


def int8_layers(model, groups: list[str]) -> list[str]:
    return group_members(capture(model, example(model)), groups) if groups else []


def label(bits: int, groups: list[str]) -> str:
    return f"W{bits}A8" + (f" ({' + '.join(groups)} W8)" if groups and bits != 8 else "")


def dataset(args) -> LabelledImages:
    return LabelledImages(args.data / "images", MODELS[MODEL].preprocess, labels=args.data / "synsets.txt")


def tensors(images: LabelledImages) -> tuple[torch.Tensor, np.ndarray]:
    xs, ys = zip(*ImageLoader(images, batch_size=50))
    return torch.cat(xs), torch.cat(ys).numpy()


def logits_of(model, images: torch.Tensor) -> np.ndarray:
    predictor = TorchPredictor(model) if isinstance(model, torch.nn.Module) else OnnxPredictor(model)
    return logits(predictor, images, 50)


def scores(logits: np.ndarray, labels: np.ndarray, reference: np.ndarray | None) -> dict:
    accuracy = Accuracy()
    accuracy.update(logits, labels)
    out = {"top1": 100 * accuracy.top1, "top5": 100 * accuracy.top5}
    if reference is not None:
        out["agree_fp32"] = 100 * float((logits.argmax(1) == reference.argmax(1)).mean())
        out["vs_fp32"] = top1_gap(logits, reference, labels)  # on 200 images one image is 0.5 points
    return out


def ptq(model, bits: int, groups: list[str], rounding: str, calib: torch.Tensor,
        batch_num: int, ada_iterations: int = 0) -> tuple[torch.nn.Module, float]:
    """PTQ with `bits` weights (the layers of `groups` at 8) and AMCT's nearest rounding, or GPTQ or AdaRound
    (`ada_iterations` steps per layer) + bias correction."""
    weight = {"num_bits": bits, "rounding": rounding, "bias_correction": rounding != "nearest"}
    rules = [Rule(weight=weight | ({"num_iteration": ada_iterations} if rounding == "adaround" else {}))]
    if groups and bits != 8:
        rules.append(Rule(group=tuple(groups), weight={"num_bits": 8}))
    config = amct.default_config(model, example(model), rules=rules, batch_num=batch_num)
    size = len(calib) // batch_num
    calib = calib.to(next(model.parameters()).device)
    start = time.perf_counter()
    qmodel = amct.quantize(model, config, lambda m: [m(calib[i * size:(i + 1) * size]) for i in range(batch_num)],
                           calib[:1])
    return qmodel, time.perf_counter() - start


def qat_worker(rank: int, world: int, args, bits: int, work: str, port: int) -> None:
    """One training process: the AMCT QAT flow; rank 0 evaluates, exports and writes result.json."""
    device = torch.device(args.device, rank) if args.device == "cuda" else torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(max(1, args.threads // world))
    torch.manual_seed(args.seed)
    os.environ.setdefault("AMCT_LOG_LEVEL", "warning")
    spec = MODELS[MODEL]
    model = spec.build(None).to(device)
    images = dataset(args)
    dummy = torch.randn(1, 3, 224, 224).to(device)
    cfg = os.path.join(work, "retrain.cfg")
    config, record = os.path.join(work, "config.json"), os.path.join(work, "record.txt")
    if rank == 0:
        Path(cfg).write_text(retrain_cfg(args.init_batches, bits, int8_layers(model, args.int8) if bits != 8 else []))
        amct.create_quant_retrain_config(config, model, dummy, cfg)
    if world > 1:
        dist.barrier()
    qmodel = amct.create_quant_retrain_model(config, model, record, dummy)
    if args.init == "ptq":  # refine the PTQ (GPTQ + bias correction) solution
        calib, _ = tensors(images.subset(0, 32 * args.calib_batches))
        calib, size = calib.to(device), len(calib) // args.calib_batches
        qat.start_from_ptq(qmodel, model, load_retrain_json(config), lambda m: [
            m(calib[i * size:(i + 1) * size]) for i in range(args.calib_batches)], dummy, args.calib_batches)
    ids = [device.index] if device.type == "cuda" else None
    trained = torch.nn.parallel.DistributedDataParallel(qmodel, device_ids=ids) if world > 1 else qmodel
    train_set = images.subset(0, args.train, spec.preprocess.augment(scale=(0.25, 1.0), seed=args.seed))
    loader = ImageLoader(train_set, args.batch_size // world, workers=args.workers,
                         sampler=EpochSampler(args.train, args.seed, rank, world), drop_last=True)
    groups = qat.parameter_groups(qmodel, weight_decay=0.0)
    groups[0]["lr"], groups[1]["lr"] = args.lr, args.quant_lr
    if args.lr == 0:  # the quantizers alone learn
        for parameter in groups[0]["params"]:
            parameter.requires_grad_(False)
        groups = groups[1:]
    optimizer = torch.optim.Adam(groups)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)
    evaluation, labels = tensors(images.subset(args.train)) if rank == 0 else (None, None)  # rank 0 evaluates
    losses, curve, train_time = [], [], 0.0
    chunk = args.eval_every or args.steps
    for done in range(0, args.steps, chunk):  # one scheduler and optimizer: chunks continue the same run
        start = time.perf_counter()
        losses += training.train(trained, loader, min(chunk, args.steps - done), optimizer, scheduler=scheduler,
                                teacher=model, kd_weight=args.kd_weight, temperature=args.temperature,
                                mixup=args.mixup, seed=args.seed, device=device)
        train_time += time.perf_counter() - start
        if args.eval_every and rank == 0:
            qmodel.eval()
            top1 = scores(logits_of(qmodel, evaluation), labels, None)["top1"]
            curve.append((len(losses), top1))
            print(f"W{bits} step {len(losses)}: held-out top-1 {top1:.2f} %, loss {np.mean(losses[-chunk:]):.4f}, "
                  f"train {train_time:.0f} s", flush=True)
    quant_state = torch.cat([p.detach().reshape(-1) for n, p in qmodel.named_parameters()
                             if n.rsplit(".", 1)[-1] in ("clip_max", "clip_min", "log_scale")])
    spread = 0.0
    if world > 1:  # the ranks must hold identical quantizers (DDP averages their gradients)
        gathered = [torch.empty_like(quant_state) for _ in range(world)]
        dist.all_gather(gathered, quant_state)
        spread = max(float((g - gathered[0]).abs().max()) for g in gathered)
    if rank == 0:
        qmodel.eval()
        sim = logits_of(qmodel, evaluation)
        report = amct.save_quant_retrain_model(config, qmodel, record, os.path.join(work, "qat"), dummy, **IO)
        deploy = logits_of(session(report["paths"]["deploy"], args.threads), evaluation)
        result = {"train_s": train_time, "losses": losses, "curve": curve, "rank_spread": spread, "sim": sim.tolist(),
                  "deploy": deploy.tolist(), "parity": report["parity"]}
        Path(work, "result.json").write_text(json.dumps(result))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def run_qat(args, bits: int) -> dict:
    work = tempfile.mkdtemp(prefix=f"qat_w{bits}_", dir=args.out)
    if args.world_size > 1:
        mp.spawn(qat_worker, args=(args.world_size, args, bits, work, 29500 + bits), nprocs=args.world_size)
    else:
        qat_worker(0, 1, args, bits, work, 0)
    result = json.loads(Path(work, "result.json").read_text())
    result["work"] = work
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "imagenet-sample")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--bits", default="4,8", help="weight bit widths, comma-separated (activations: 8)")
    parser.add_argument("--train", type=int, default=600, help="the first N images train, the rest evaluate")
    parser.add_argument("--steps", type=int, default=60, help="QAT steps (0: the PTQ rows only)")
    parser.add_argument("--batch-size", type=int, default=32, help="global batch (split over --world-size)")
    parser.add_argument("--lr", type=float, default=5e-5, help="Adam learning rate of the weights (0: frozen)")
    parser.add_argument("--quant-lr", type=float, default=1e-4, help="Adam learning rate of clips and scales")
    parser.add_argument("--kd-weight", type=float, default=1.0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--mixup", type=float, default=0.0, metavar="ALPHA",
                        help="blend each batch with its reverse, weight ~ Beta(ALPHA, ALPHA) (0: off)")
    parser.add_argument("--init-batches", type=int, default=2, help="batch_num: batches of IFMR initialisation")
    parser.add_argument("--calib-batches", type=int, default=8, help="PTQ: batches of 32 of calibration")
    parser.add_argument("--ada-iterations", type=int, default=0, metavar="N",
                        help="PTQ: also a row with AdaRound (ada_quantize), N Adam steps per layer (0: no row)")
    parser.add_argument("--init", choices=("ifmr", "ptq"), default="ptq",
                        help="QAT starts from the float weights with IFMR ranges, or from the PTQ (GPTQ) model")
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--eval-every", type=int, default=0, metavar="N",
                        help="evaluate the QAT model on the held-out images every N steps (0: at the end only)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-ptq", action="store_true")
    parser.add_argument("--int8", default="", help="comma list of layer groups whose weights stay 8-bit: first "
                        "(the stem conv), depthwise; a retrain.cfg override_layer_configs entry per layer")
    args = parser.parse_args()
    args.int8 = [g for g in args.int8.split(",") if g]
    if args.steps < 0 or (args.steps == 0 and args.skip_ptq):
        parser.error("--steps: at least 1 (0, the PTQ rows only, needs PTQ: drop --skip-ptq)")
    if not args.mixup >= 0:
        parser.error(f"--mixup: expected alpha >= 0 (0: off), got {args.mixup}")
    if set(args.int8) - set(LAYER_GROUPS):
        parser.error(f"--int8: unknown layer groups {sorted(set(args.int8) - set(LAYER_GROUPS))}")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("AMCT_LOG_LEVEL", "warning")

    images = dataset(args)
    evaluation, labels = tensors(images.subset(args.train))
    model = MODELS[MODEL].build(None).to(args.device)
    fp32 = logits_of(model, evaluation)
    rows = [("FP32", scores(fp32, labels, None), "")]
    for bits in [int(b) for b in args.bits.split(",")]:
        if not args.skip_ptq:
            calib, _ = tensors(images.subset(0, 32 * args.calib_batches))
            roundings = [("nearest", "ARQ"), ("gptq", "GPTQ")]
            if args.ada_iterations:
                roundings.append(("adaround", f"AdaRound {args.ada_iterations} it."))
            for rounding, name in roundings:
                qmodel, seconds = ptq(model, bits, args.int8, rounding, calib,
                                      args.calib_batches, args.ada_iterations)
                rows.append((f"PTQ {label(bits, args.int8)} {name}",
                             scores(logits_of(qmodel, evaluation), labels, fp32), f"calib {seconds:.0f} s"))
                print(rows[-1], flush=True)
        if args.steps == 0:
            continue
        result = run_qat(args, bits)
        sim, deploy = np.asarray(result["sim"]), np.asarray(result["deploy"])
        note = (f"train {result['train_s']:.0f} s, {args.steps} steps x {args.batch_size}, world {args.world_size}, "
                f"final loss {np.mean(result['losses'][-10:]):.3f}, rank spread {result['rank_spread']:.2g}")
        rows.append((f"QAT {label(bits, args.int8)}", scores(sim, labels, fp32), note))
        deploy_scores = scores(deploy, labels, fp32)
        deploy_scores["agree_sim"] = 100 * float((deploy.argmax(1) == sim.argmax(1)).mean())
        rows.append((f"QAT {label(bits, args.int8)} deploy ONNX", deploy_scores, result["work"]))
        print(rows[-2], rows[-1], flush=True)

    print(f"\nEfficientNet-Lite0, trained on images 0..{args.train - 1}, evaluated on the other "
          f"{len(labels)} (top-1 / top-5 %, top-1 agreement with FP32 %)")
    print(f"{'model':44s} {'top1':>7s} {'top5':>7s} {'agree':>7s} {'vs FP32 (s.e.)':>15s}  notes")
    for name, s, note in rows:
        agree = f"{s['agree_fp32']:7.2f}" if "agree_fp32" in s else " " * 7
        gap = f"{s['vs_fp32']['gap']:+7.2f} ({s['vs_fp32']['se']:4.2f})" if "vs_fp32" in s else " " * 15
        extra = f", agree sim {s['agree_sim']:.2f}" if "agree_sim" in s else ""
        print(f"{name:44s} {s['top1']:7.2f} {s['top5']:7.2f} {agree} {gap}  {note}{extra}")
    (args.out / "qat_results.json").write_text(json.dumps([{"model": n, **s, "notes": t} for n, s, t in rows],
                                                          indent=1))


if __name__ == "__main__":
    main()
