"""Calibration speed: openamct's default W8A8 calibration against ONNX Runtime's quantize_static MinMax.

For each model (EfficientNet-Lite0 with its real weights on 256 images; ResNet-50 and ResNet-101 with random weights,
seed 0, on 160 images) it measures, on the same images:

- openamct: wall time from ``amct.create_quant_config`` through ``amct.quantize_model``, the calibration batches (32
  images each, batch_num = their number) to ``amct.save_model``, as the README's AMCT script does it;
- ORT: ``quant_pre_process`` + ``quantize_static`` (QDQ, MinMax, per-channel), calibration batch 1 (ortbaseline's
  default), on the leanest FP32 ONNX file at hand: the BN-folded ``tmp/modified_model.onnx`` that openamct's run just
  wrote (no shape arithmetic for Lite0's SAME padding; its biases carry openamct's bias correction, which changes
  nothing in the timing), else, or where ORT fails on it, ``torch.onnx.export`` of the eval model.

Each side runs in its own fresh child process (spawned for openamct; ortbaseline's subprocess for ORT), pinned to
the first ``--threads`` CPUs when the machine has more, so the peak RSS (the child's VmHWM, read at its end) is its
own, and interpreter start-up, imports, model building and image decoding (done once, here) are not timed.
``--rounds R`` interleaves: each round runs, per model, openamct then ORT back to back; the table gives medians.
``--accuracy`` then evaluates Lite0's FP32 ONNX file and openamct's deploy model in ORT on all 800 images.

Run by hand (not in CI), e.g. ``python benchmarks/speed.py --rounds 3 --out /tmp/speed``; quick check:
``python benchmarks/speed.py --models efficientnet_lite0 --images-lite0 32 --out /tmp/speedtest``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ortbaseline import ort_quantize_static, proc_mem_mb  # noqa: E402

import openamct as amct  # noqa: E402
from openamct.app.data import ImageLoader, LabelledImages  # noqa: E402
from openamct.app.evaluation import OnnxPredictor, logits  # noqa: E402
from openamct.app.models import MODELS, ResNet50, ResNet101  # noqa: E402

ALL_MODELS = ("efficientnet_lite0", "resnet50", "resnet101")
RANDOM = {"resnet50": ResNet50, "resnet101": ResNet101}  # random weights, seed 0 (no checkpoint needed)
BATCH = 32
IO = dict(input_names=["input"], output_names=["output"],
          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return RANDOM[name]().eval() if name in RANDOM else MODELS[name].build(None)


def preprocess(name: str):
    return MODELS["resnet101" if name in RANDOM else name].preprocess  # ResNet-50: ResNet-101's preprocessing


def load_images(data: Path, name: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    dataset = LabelledImages(data / "images", preprocess(name), labels=data / "synsets.txt", limit=n)
    loader = ImageLoader(dataset, batch_size=BATCH, workers=2)
    xs, ys = zip(*loader)
    if loader.skipped:
        raise RuntimeError(f"unreadable images: {loader.skipped}")
    return torch.cat(xs).numpy(), torch.cat(ys).numpy()


@contextlib.contextmanager
def pinned(threads: int):
    """Children started inside inherit an affinity of the first `threads` allowed CPUs (ORT's calibration session
    otherwise sizes its pool to the whole machine); nothing changes where there are no more CPUs than that."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) > threads:
        os.sched_setaffinity(0, allowed[:threads])
    try:
        yield
    finally:
        os.sched_setaffinity(0, allowed)


# ---------------------------------------------------------------- openamct (in a spawned child)

def openamct_child(name: str, images_path: str, threads: int, work: str, batch: int) -> None:
    torch.set_num_threads(threads)
    os.environ.setdefault("AMCT_LOG_LEVEL", "warning")  # console; amct_log/ in `work` keeps info
    os.chdir(work)
    model = build(name)
    images = np.load(images_path, mmap_mode="r")
    x0 = torch.from_numpy(np.array(images[:1]))
    starts = range(0, len(images), batch)
    base = proc_mem_mb()
    t0 = time.perf_counter()
    amct.create_quant_config("config.json", model, x0, batch_num=len(starts))
    calib = amct.quantize_model("config.json", "tmp/modified_model.onnx", "tmp/record.txt", model, x0, **IO)
    with torch.no_grad():
        for i in starts:
            calib(torch.from_numpy(np.array(images[i:i + batch])))
    report = amct.save_model("tmp/modified_model.onnx", "tmp/record.txt", os.path.join(work, name))
    seconds = time.perf_counter() - t0
    Path("result.json").write_text(json.dumps({
        "seconds": seconds, "peak_rss_mb": proc_mem_mb(), "base_rss_mb": base, "batches": len(starts),
        "deploy": report["paths"]["deploy"],
        "parity_ok": all(p["ok"] for p in (report.get("parity") or {}).values())}))


def run_openamct(name: str, images_path: str, threads: int, work: Path, batch: int) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    (work / "result.json").unlink(missing_ok=True)
    proc = mp.get_context("spawn").Process(target=openamct_child, args=(name, images_path, threads, str(work), batch))
    with pinned(threads):
        proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"{name}: openamct calibration child failed (exit code {proc.exitcode})")
    return json.loads((work / "result.json").read_text())


def run_ort(fp32_files: list[str], images_path: str, threads: int, out_path: str) -> dict:
    """ORT MinMax on the first of `fp32_files` it quantizes without failing; the result names the file."""
    for i, src in enumerate(fp32_files):
        try:
            with pinned(threads):
                res = ort_quantize_static(src, np.load(images_path, mmap_mode="r"), out_path, "MinMax", batch=1)
            return {**res, "fp32_onnx": src, "failed_on": fp32_files[:i]}
        except RuntimeError as e:
            if i == len(fp32_files) - 1:
                raise
            print(f"  ORT failed on {src}, trying {fp32_files[i + 1]}: {str(e).splitlines()[-1]}", flush=True)
    raise ValueError("no FP32 ONNX file")


# ---------------------------------------------------------------- accuracy (Lite0)

def accuracy(fp32_onnx: str, deploy: str, images: np.ndarray, labels: np.ndarray, n_calib: int, threads: int):
    ref = logits(OnnxPredictor(fp32_onnx, threads=threads), images, BATCH)
    quant = logits(OnnxPredictor(deploy, threads=threads), images, BATCH)
    lp = torch.log_softmax(torch.from_numpy(ref).double(), 1)
    lq = torch.log_softmax(torch.from_numpy(quant).double(), 1)
    top1 = lambda out, part: 100 * float((out[part].argmax(1) == labels[part]).mean())
    held = slice(n_calib, None)
    return {"images": len(labels), "held_out": len(labels[held]), "calib": n_calib,
            "fp32_top1": top1(ref, slice(None)), "openamct_top1": top1(quant, slice(None)),
            "fp32_top1_held": top1(ref, held) if len(labels[held]) else None,
            "openamct_top1_held": top1(quant, held) if len(labels[held]) else None,
            "mean_kl": float((lp.exp() * (lp - lq)).sum(1).mean())}


# ---------------------------------------------------------------- report

def markdown(results: dict) -> str:
    lines = ["| model | images | openamct s | ORT MinMax s | ratio | openamct peak MB | ORT peak MB |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results["models"].items():
        lines.append(f"| {name} | {r['images']} | {r['openamct_s']:.1f} | {r['ort_s']:.1f} | {r['ratio']:.2f} "
                     f"| {r['openamct_peak_mb']:.0f} | {r['ort_peak_mb']:.0f} |")
    a = results.get("accuracy")
    if a:
        held = (f"; on the {a['held_out']} images not used for calibration (images {a['calib']}..{a['images'] - 1}):"
                f" FP32 {a['fp32_top1_held']:.2f} %, openamct {a['openamct_top1_held']:.2f} %"
                if a["held_out"] else "")
        lines += ["", f"efficientnet_lite0 in ORT on {a['images']} images: top-1 FP32 {a['fp32_top1']:.2f} %, "
                      f"openamct W8A8 deploy {a['openamct_top1']:.2f} %{held}; "
                      f"mean KL(FP32 || W8A8) {a['mean_kl']:.4f}"]
    lines += ["", "Notes:", ""] + [f"- {n}" for n in results["notes"]]
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(ALL_MODELS), help=f"comma list of {', '.join(ALL_MODELS)}")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "imagenet-sample",
                   help="folder with images/ and synsets.txt")
    p.add_argument("--out", type=Path, default=Path("/tmp/speedbench"))
    p.add_argument("--images-lite0", type=int, default=256)
    p.add_argument("--images-resnet", type=int, default=160)
    p.add_argument("--batch-size", type=int, default=BATCH, help="openamct's calibration batch (default 32)")
    p.add_argument("--accuracy", action="store_true",
                   help="after the timed runs, Lite0's FP32 and openamct deploy model top-1 and KL on 800 images")
    args = p.parse_args()
    names = [m for m in args.models.split(",") if m]
    if bad := [m for m in names if m not in ALL_MODELS]:
        p.error(f"unknown models {bad}; choose from {', '.join(ALL_MODELS)}")
    if args.accuracy and "efficientnet_lite0" not in names:
        p.error("--accuracy needs efficientnet_lite0 in --models")
    torch.set_num_threads(args.threads)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    counts = {m: args.images_lite0 if m == "efficientnet_lite0" else args.images_resnet for m in names}
    images, fp32, runs, decoded = {}, {}, {}, {}
    for name in names:
        n = max(counts[name], 800 if args.accuracy and name == "efficientnet_lite0" else 0)
        key = (preprocess(name), n)
        if key not in decoded:
            print(f"decoding {n} images for {name} ...", flush=True)
            decoded[key] = load_images(args.data, name, n)
        x = decoded[key][0]
        if len(x) < counts[name]:
            raise SystemExit(f"{name}: {len(x)} images in {args.data}, {counts[name]} wanted")
        images[name] = str(out / f"{name}_images.npy")
        np.save(images[name], x[:counts[name]])
        fp32[name] = str(out / f"{name}_fp32.onnx")
        with warnings.catch_warnings():  # the TorchScript exporter's deprecation and constant-folding warnings
            warnings.simplefilter("ignore")
            torch.onnx.export(build(name), torch.from_numpy(x[:1].copy()), fp32[name], dynamo=False,
                              opset_version=17, **IO)
        runs[name] = []

    for r in range(args.rounds):
        for name in names:
            print(f"round {r + 1}/{args.rounds}: {name} openamct ...", flush=True)
            work = out / name / "openamct"
            ours = run_openamct(name, images[name], args.threads, work, args.batch_size)
            print(f"  {ours['seconds']:.1f} s, peak {ours['peak_rss_mb']:.0f} MB; ORT MinMax ...", flush=True)
            folded = work / "tmp" / "modified_model.onnx"
            ort = run_ort(([str(folded)] if folded.is_file() else []) + [fp32[name]], images[name], args.threads,
                          str(out / name / "ort_minmax.onnx"))
            print(f"  {ort['seconds']:.1f} s, peak {ort['peak_rss_mb']:.0f} MB", flush=True)
            runs[name].append({"openamct": ours, "ort": ort})

    notes = [f"ORT calibration batch 1; openamct batches of {args.batch_size}; {args.threads} threads "
             f"(torch.set_num_threads; both children pinned to {args.threads} CPUs where the machine has more)",
             f"median of {args.rounds} interleaved round(s); peak = the child's VmHWM (imports included)"]
    models = {}
    for name, rs in runs.items():
        m = models[name] = {"images": counts[name], "runs": rs}
        for key, side, field in (("openamct_s", "openamct", "seconds"), ("ort_s", "ort", "seconds"),
                                 ("openamct_peak_mb", "openamct", "peak_rss_mb"), ("ort_peak_mb", "ort", "peak_rss_mb"),
                                 ("openamct_base_mb", "openamct", "base_rss_mb"),
                                 ("ort_base_mb", "ort", "child_base_rss_mb")):
            m[key] = statistics.median(x[side][field] for x in rs)
        m["ratio"] = m["openamct_s"] / m["ort_s"]
        notes.append(f"{name}: peak RSS before the timed part (imports; openamct also its model): openamct "
                     f"{m['openamct_base_mb']:.0f} MB, ORT {m['ort_base_mb']:.0f} MB")
        for x in rs:
            src = x["ort"]["fp32_onnx"]
            notes.append(f"{name}: FP32 ONNX for ORT: " + ("openamct's BN-folded tmp/modified_model.onnx"
                         if src != fp32[name] else "torch.onnx.export (dynamo=False, opset 17, dynamic batch)")
                         + (f" (ORT failed on {x['ort']['failed_on']})" if x["ort"]["failed_on"] else ""))
            if not x["ort"]["preprocessed"]:
                notes.append(f"{name}: ORT quant_pre_process failed, quantized without it: "
                             f"{x['ort']['preprocess_error']}")
            if not x["openamct"]["parity_ok"]:
                notes.append(f"{name}: openamct save_model parity NOT ok")
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "models": models,
               "notes": list(dict.fromkeys(notes))}

    if args.accuracy:
        name = "efficientnet_lite0"
        x, y = decoded[(preprocess(name), max(counts[name], 800))]
        print(f"accuracy on {len(y)} images ...", flush=True)
        results["accuracy"] = accuracy(fp32[name], runs[name][-1]["openamct"]["deploy"], x, y, counts[name],
                                       args.threads)

    table = markdown(results)
    print("\n" + table)
    for path, text in ((out / "speed_results.json", json.dumps(results, indent=2)), (out / "speed_results.md", table)):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


if __name__ == "__main__":
    main()
