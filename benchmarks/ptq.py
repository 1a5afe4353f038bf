"""PTQ benchmark: openamct (IFMR, HFMG, NUQ) against ONNX Runtime's quantize_static on EfficientNet-Lite0.

Run by hand (not in CI), e.g. ``python benchmarks/ptq.py --out /tmp/ptqbench``.  Calibrates on the first
``--calib`` images (``--batch-num`` batches), evaluates on the first ``--eval``, and prints/writes one table:
accuracy (also on the images calibration did not see) and top-1 agreement of every model, the time and peak RSS of
quantization (openamct: quantize_model, the calibration batches and save_model, whose weight algorithms, block
reconstruction, export and parity check run there; ORT: quantize_static), ORT latency and integer-op counts.
Low-bit rows: ``--algos w4-gptq,w4-adaround,w4-block,w4dw8-block,w8-block,nuq16-block`` runs IFMR activations
with W4 weights on every layer (``w4``), W4 with the stem and depthwise convs at W8 (``w4dw8``), W8 (``w8``) or
the NUQ .cfg with N levels (``nuqN``), and GPTQ (the
default), AdaRound (``ada_quantize``, ``--ada-iterations`` steps per layer) or block reconstruction after GPTQ
(``block_reconstruction``, ``--block-iterations`` steps per block), each set in the JSON config as a user would.
Every openamct row gets its top-1 gap to FP32 on the images calibration did not see, with its paired standard error.
``--nuq 16,32`` adds one run per num_steps N ("nuqN": IFMR activations, NUQ weights on the layers the size rule
picks, the rest uniform INT8), a table of their weight bytes from save_model's report, and one of their top-1 gap
to W8A8 (IFMR) with its standard error, paired over the same images.
Each openamct calibration runs in a spawned child so that its peak RSS is its own, as ORT's quantization
does in ortbaseline.py; the peak is the child's VmHWM (ru_maxrss would include this process's RSS at the fork).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ortbaseline import (  # noqa: E402
    INTEGER_OP_TYPES,
    integer_ops,
    ort_latency,
    ort_quantize_static,
    ort_session,
    proc_mem_mb,
)

import openamct as amct  # noqa: E402
from openamct.app.data import Accuracy, ImageLoader, LabelledImages, top1_gap  # noqa: E402
from openamct.app.evaluation import OnnxPredictor, TorchPredictor, logits  # noqa: E402
from openamct.app.models import MODELS  # noqa: E402
from openamct.core.capture import capture, group_members  # noqa: E402

MODEL = "efficientnet_lite0"
IO = dict(input_names=["input"], output_names=["output"],
          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
HFMG_CFG = "batch_num: {n}\ncommon_config {{ hfmg_quantize {{ num_of_bins: 4096 }} }}\n"
NUQ_CFG = "batch_num: {n}\nnuq_config {{ nuq_quantize {{ num_steps: {steps} }} }}\n"


def load_images(data: Path, n: int):
    spec = MODELS[MODEL]
    dataset = LabelledImages(data / "images", spec.preprocess, labels=data / "synsets.txt", limit=n)
    xs, ys = zip(*ImageLoader(dataset, batch_size=32, workers=2))
    return torch.cat(xs).numpy(), torch.cat(ys).numpy()


def predict(model, images: np.ndarray, batch: int = 32) -> np.ndarray:
    """Logits of a torch module or an ORT InferenceSession on ``images``."""
    predictor = TorchPredictor(model) if isinstance(model, torch.nn.Module) else OnnxPredictor(model)
    return logits(predictor, images, batch)


def evaluate(model, images, labels, refs: dict | None = None, held_from: int = 0) -> dict:
    """top-1/top-5 (%), top-1 (%) on images[held_from:] (those calibration did not see) and top-1 agreement (%)
    with each reference logits array in ``refs``."""
    return scores(predict(model, images), labels, refs, held_from)


def held_out(held_from: int, count: int) -> slice | None:
    """images[held_from:], those calibration did not see; None where that part is empty or is all of them.
    GPTQ and the ranges fit the calibration images best, so this is the fair part to score."""
    return slice(held_from, None) if 0 < held_from < count else None


def scores(logits: np.ndarray, labels: np.ndarray, refs: dict | None = None, held_from: int = 0) -> dict:
    acc, held = Accuracy(), Accuracy()
    acc.update(logits, labels)
    res = {"top1": 100 * acc.top1, "top5": 100 * acc.top5, "logits": logits}
    part = held_out(held_from, len(labels))
    if part is not None:
        held.update(logits[part], labels[part])
        res["top1_held"] = 100 * held.top1
    for name, ref in (refs or {}).items():
        res[f"agree_{name}"] = agree(logits, ref)
    return res


def agree(a: np.ndarray, b: np.ndarray) -> float:
    return 100 * float((a.argmax(1) == b.argmax(1)).mean())


# ---------------------------------------------------------------- openamct calibration (in a child process)

LOW_BIT = re.compile(r"(w4|w4dw8|w8|nuq\d+)-(gptq|adaround|block)$")


def low_bit_config(path: str, algo: str, model, x0, iterations: dict) -> None:
    """Edit create_quant_config's JSON for a LOW_BIT `algo`, as a user would: weight bits per layer, AMCT's
    ada_quantize, or openamct's block_reconstruction object."""
    weights, method = LOW_BIT.match(algo).groups()
    if weights.startswith("nuq") and method == "adaround":
        raise ValueError(f"{algo}: AdaRound does not take NUQ codebooks (use nuqN-block)")
    eight = set(group_members(capture(model, x0), ["first", "depthwise"])) if weights == "w4dw8" else set()
    config = json.loads(Path(path).read_text())
    for name, layer in config.items():
        if isinstance(layer, dict) and "weight_quant_params" in layer and not weights.startswith("nuq"):
            params = layer["weight_quant_params"]
            params["num_bits"] = 8 if weights == "w8" or name in eight else 4
            if method == "adaround":
                params.update(wts_algo="ada_quantize", rounding="adaround", num_iteration=iterations["adaround"])
    if method == "block":
        config["block_reconstruction"] = {"num_iteration": iterations["block"]}
    Path(path).write_text(json.dumps(config, indent=4))


def calibrate_child(algo: str, images_path: str, n_calib: int, batch_num: int, n_eval: int, work: str,
                    iterations: dict) -> None:
    """Child body: config, quantize_model + batch_num batches (timed), save_model, PyTorch-simulation logits.
    `algo` is "ifmr", "hfmg", "nuqN" (NUQ weights with num_steps N) or a LOW_BIT name."""
    torch.set_num_threads(2)
    os.environ.setdefault("AMCT_LOG_LEVEL", "warning")  # console; amct_log/ in `work` keeps info
    os.chdir(work)
    model = MODELS[MODEL].build(None)
    base = proc_mem_mb()
    images = np.load(images_path, mmap_mode="r")
    x0 = torch.from_numpy(np.array(images[:1]))
    cfg = None
    if algo == "hfmg":
        cfg = os.path.join(work, "hfmg.cfg")
        Path(cfg).write_text(HFMG_CFG.format(n=batch_num))
    elif algo.startswith("nuq"):  # nuqN, or nuqN-<method>: the NUQ .cfg, then the method in the JSON
        cfg = os.path.join(work, f"{algo}.cfg")
        Path(cfg).write_text(NUQ_CFG.format(n=batch_num, steps=int(algo[3:].split("-")[0])))
    t0 = time.perf_counter()
    amct.create_quant_config("config.json", model, x0, batch_num=batch_num, config_defination=cfg)
    if LOW_BIT.match(algo):
        low_bit_config("config.json", algo, model, x0, iterations)
    t1 = time.perf_counter()
    qmodel = amct.quantize_model("config.json", "modified_model.onnx", "record.txt", model, x0, **IO)
    step = n_calib // batch_num
    with torch.no_grad():
        for i in range(batch_num):
            qmodel(torch.from_numpy(np.array(images[i * step:(i + 1) * step])))
    t2 = time.perf_counter()
    peak = proc_mem_mb()
    report = amct.save_model("modified_model.onnx", "record.txt", os.path.join(work, algo))
    t3, save_peak = time.perf_counter(), proc_mem_mb()
    np.save("sim_logits.npy", predict(qmodel, images[:n_eval]))
    nuq_layers = None
    if "nuq_weights" in report["paths"]:
        with np.load(report["paths"]["nuq_weights"]) as packed:
            nuq_layers = len({key.rsplit(".", 1)[0] for key in packed.files})
    Path("result.json").write_text(json.dumps({
        "config_s": t1 - t0, "calib_s": t2 - t1, "base_rss_mb": base, "peak_rss_mb": peak, "save_s": t3 - t2,
        "save_peak_rss_mb": save_peak, "child_peak_rss_mb": proc_mem_mb(), "paths": report["paths"],
        "parity": report["parity"], "weight_bytes": report["weight_bytes"], "nuq_layers": nuq_layers}))


def run_calibration(algo: str, images_path: str, args, out: Path) -> dict:
    work = out / algo
    work.mkdir(parents=True, exist_ok=True)
    proc = mp.get_context("spawn").Process(
        target=calibrate_child, args=(algo, images_path, args.calib, args.batch_num, args.eval, str(work),
                                      {"adaround": args.ada_iterations, "block": args.block_iterations}))
    t0 = time.perf_counter()
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"{algo} calibration child failed (exit code {proc.exitcode})")
    res = json.loads((work / "result.json").read_text())
    res["child_wall_s"] = time.perf_counter() - t0
    return res


class MemoryWatchdog(threading.Thread):
    """Kills (by pid) any direct child of this process whose RSS exceeds ``limit_mb``; remembers which."""

    def __init__(self, limit_mb: float):
        super().__init__(daemon=True)
        self.limit_mb, self.killed = limit_mb, []

    def run(self):
        while True:
            for pid in self._children():
                try:
                    with open(f"/proc/{pid}/status") as status:
                        rss = int(next(line for line in status if line.startswith("VmRSS")).split()[1]) / 1024
                except (OSError, StopIteration):
                    continue
                if rss > self.limit_mb:
                    self.killed.append((pid, rss))
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)

    @staticmethod
    def _children():
        for task in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError), open(f"/proc/self/task/{task}/children") as children:
                yield from map(int, children.read().split())


# ---------------------------------------------------------------- report

def fmt(v, spec=".1f"):
    return "" if v is None else format(v, spec)


def markdown(results: dict) -> str:
    cols = ["model", "top-1 %", "top-1 % not calib.", "gap to FP32 not calib. (s.e.)", "top-5 %", "agree FP32 %",
            "agree sim %", "quantize s", "peak RSS MB", "base RSS MB"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, r in results["rows"].items():
        gap = f"{r['gap_held']['gap']:+.2f} ({r['gap_held']['se']:.2f})" if "gap_held" in r else ""
        cells = [name, fmt(r.get("top1")), fmt(r.get("top1_held")), gap, fmt(r.get("top5")), fmt(r.get("agree_fp32")),
                 fmt(r.get("agree_sim")), fmt(r.get("seconds")), fmt(r.get("peak_rss_mb"), ".0f"),
                 fmt(r.get("base_rss_mb"), ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    if results.get("latency"):
        lines += ["", "ORT latency, 2 threads, median ms per batch (interleaved rounds)", "",
                  "| batch | " + " | ".join(results["latency"]["models"]) + " | FP32/ours | ORT/ours |",
                  "|---|" + "---|" * (len(results["latency"]["models"]) + 2)]
        for b, ms in results["latency"]["ms"].items():
            lines.append(f"| {b} | " + " | ".join(f"{v:.1f}" for v in ms.values())
                         + f" | {ms['fp32'] / ms['ours_ifmr']:.2f} | {ms['ort_best'] / ms['ours_ifmr']:.2f} |")
    if results.get("weights"):
        lines += ["", "Weight bytes of the quantized Conv2d/Linear layers (save_model's report)", "",
                  "| model | FP32 | uniform INT8 | NUQ packed | packed/INT8 | NUQ layers |", "|" + "---|" * 6]
        for name, w in results["weights"].items():
            lines.append(f"| {name} | {w['fp32']} | {w['int8']} | {w['nuq_packed']} | {w['packed_over_int8']:.3f} "
                         f"| {w['nuq_layers']} of {w['layers']} |")
    if results.get("gaps"):
        lines += ["", "Top-1 gap to uniform W8A8 (IFMR) on the same images, with its standard error (paired)", "",
                  "| model | images | gap (points) | s.e. | images only it gets right | images only W8A8 gets right |",
                  "|" + "---|" * 6]
        for name, by_part in results["gaps"].items():
            for part, g in by_part.items():
                lines.append(f"| {name} | {part} | {g['gap']:+.2f} | {g['se']:.2f} | {g['better']} | {g['worse']} |")
    if results.get("ops"):
        lines += ["", "Op counts after ORT level-ALL optimisation (integer ops; float Conv/MatMul/Gemm)", ""]
        for name, ops in results["ops"].items():
            ints = {k: v for k, v in ops.items() if k in INTEGER_OP_TYPES}
            flts = {k: v for k, v in ops.items() if k in ("Conv", "FusedConv", "MatMul", "Gemm", "FusedGemm")}
            lines.append(f"- {name}: integer {sum(ints.values())} {ints}; float {flts}; all {dict(ops)}")
    if results.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {n}" for n in results["notes"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "imagenet-sample",
                   help="folder with images/ and synsets.txt")
    p.add_argument("--calib", type=int, default=256)
    p.add_argument("--batch-num", type=int, default=8)
    p.add_argument("--eval", type=int, default=800)
    p.add_argument("--algos", default="ifmr,hfmg")
    p.add_argument("--nuq", default="", help="comma list of NUQ num_steps, e.g. 16,32: one NUQ run each")
    p.add_argument("--ada-iterations", type=int, default=2000, help="AdaRound steps per layer (*-adaround rows)")
    p.add_argument("--block-iterations", type=int, default=300, help="steps per block (*-block rows)")
    p.add_argument("--ort-methods", default="MinMax,Percentile")
    p.add_argument("--rounds", type=int, default=7, help="latency rounds (after 2 warm-up rounds)")
    p.add_argument("--out", type=Path, default=Path("/tmp/ptqbench"))
    p.add_argument("--skip-ort", action="store_true", help="skip ORT's quantize_static baselines")
    p.add_argument("--mem-limit-gb", type=float, default=20.0, help="kill a child process beyond this RSS")
    args = p.parse_args()
    torch.set_num_threads(2)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    watchdog = MemoryWatchdog(args.mem_limit_gb * 1024)
    watchdog.start()
    rows, notes = {}, []
    weights = {}
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "weights": weights, "notes": notes}

    images, labels = load_images(args.data, max(args.calib, args.eval))
    images_path = str(out / "images.npy")
    np.save(images_path, images)
    ev_x, ev_y = images[:args.eval], labels[:args.eval]
    print(f"{len(images)} images loaded; calibrating on {args.calib}, evaluating on {len(ev_x)}", flush=True)

    model = MODELS[MODEL].build(None)
    held_from = args.calib
    fp32 = evaluate(model, ev_x, ev_y, held_from=held_from)
    ref = {"fp32": fp32["logits"]}
    rows["FP32 PyTorch"] = fp32
    fp32_onnx = str(out / "fp32.onnx")
    torch.onnx.export(model, torch.from_numpy(ev_x[:1].copy()), fp32_onnx, dynamo=False, opset_version=17, **IO)
    rows["FP32 ONNX (ORT)"] = evaluate(ort_session(fp32_onnx), ev_x, ev_y, ref, held_from)
    del model

    deploy = {}
    algos = [a for a in args.algos.split(",") if a] + [f"nuq{int(n)}" for n in args.nuq.split(",") if n]
    for algo in algos:
        print(f"calibrating openamct {algo} ...", flush=True)
        c = run_calibration(algo, images_path, args, out)
        sim = np.load(out / algo / "sim_logits.npy")
        part = held_out(held_from, len(ev_y)) or slice(None)
        rows[f"{algo.upper()} PyTorch sim"] = {
            **scores(sim, ev_y, {"fp32": ref["fp32"]}, held_from),
            "gap_held": top1_gap(sim[part], ref["fp32"][part], ev_y[part]),
            "seconds": c["calib_s"] + c["save_s"], "peak_rss_mb": max(c["peak_rss_mb"], c["save_peak_rss_mb"]),
            "base_rss_mb": c["base_rss_mb"], "calib": c}
        for kind in ("fake_quant", "deploy"):
            rows[f"{algo.upper()} {kind} ONNX (ORT)"] = evaluate(
                ort_session(c["paths"][kind]), ev_x, ev_y, {**ref, "sim": sim}, held_from)
        deploy[algo] = c["paths"]["deploy"]
        if c["weight_bytes"]:
            total = c["weight_bytes"]["total"]
            weights[algo.upper()] = {**total, "packed_over_int8": total["nuq_packed"] / total["int8"],
                                     "nuq_layers": c["nuq_layers"], "layers": len(c["weight_bytes"]["layers"])}
        notes.append(f"{algo}: create_quant_config {c['config_s']:.1f} s; calibration batches {c['calib_s']:.1f} s, "
                     f"peak RSS {c['peak_rss_mb']:.0f} MB; save_model {c['save_s']:.1f} s, peak RSS "
                     f"{c['save_peak_rss_mb']:.0f} MB")
        for kind, par in (c["parity"] or {}).items():
            if not par["ok"]:
                notes.append(f"{algo} {kind}: save_model parity NOT ok: {par}")

    ort_models = {}
    if not args.skip_ort:
        for method in [m for m in args.ort_methods.split(",") if m]:
            print(f"ORT quantize_static {method} ...", flush=True)
            path = str(out / f"ort_{method.lower()}.onnx")
            try:
                q = ort_quantize_static(fp32_onnx, images[:args.calib], path, method)
            except RuntimeError as e:
                why = f" (killed by the memory watchdog: {watchdog.killed})" if watchdog.killed else ""
                notes.append(f"ORT {method} failed{why}: {str(e).splitlines()[0]}")
                watchdog.killed.clear()
                continue
            r = evaluate(ort_session(path), ev_x, ev_y, ref, held_from)
            r.update(seconds=q["seconds"], peak_rss_mb=q["peak_rss_mb"], base_rss_mb=q["child_base_rss_mb"], quant=q)
            rows[f"ORT {method}"] = r
            ort_models[method] = path

    if "ifmr" in deploy:
        paths = {"fp32": fp32_onnx, "ours_ifmr": deploy["ifmr"]}
        if ort_models:
            best = max(ort_models, key=lambda m: (rows[f"ORT {m}"]["top1"], rows[f"ORT {m}"]["top5"]))
            paths["ort_best"] = ort_models[best]
            notes.append(f"ort_best = ORT {best}")
        else:
            paths["ort_best"] = fp32_onnx
            notes.append("no ORT model: ort_best column is FP32 again")
        print("measuring latency ...", flush=True)
        results["latency"] = {"models": list(paths), "ms": {
            b: ort_latency(paths, b, threads=2, rounds=args.rounds) for b in (1, 32)}}
    results["ops"] = {f"ours_{a}": dict(integer_ops(p)) for a, p in deploy.items()}
    results["ops"].update({f"ort_{m}": dict(integer_ops(p)) for m, p in ort_models.items()})

    if "IFMR PyTorch sim" in rows:
        base = rows["IFMR PyTorch sim"]["logits"]
        parts = {"all": slice(None), "not calib.": held_out(held_from, len(ev_y))}
        parts = {name: part for name, part in parts.items() if part is not None}
        results["gaps"] = {a.upper(): {part: top1_gap(rows[f"{a.upper()} PyTorch sim"]["logits"][i], base[i], ev_y[i])
                                       for part, i in parts.items()} for a in algos if a.startswith("nuq")}
    for r in rows.values():
        r.pop("logits", None)
    table = markdown(results)
    print("\n" + table)
    (out / "ptq_results.md").write_text(table)
    (out / "ptq_results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
