"""The architecture zoo (benchmarks/zoo_models.py) quantized by openamct and by ONNX Runtime, one model at a time.

Per model, at its real shapes ("full"):

- FP32: the fastest of the FP32 ONNX files this script can make: ``torch.onnx.export`` with ``dynamo=False``
  and ``dynamo=True`` (which runs onnxscript's optimizer), each also through onnxslim, those whose outputs
  differ from PyTorch's by more than 1e-3 of their range dropped; the fastest at batch 16 (3 runs each, after
  one) is the baseline, and the file ORT's quantizer is handed;
- openamct: the AMCT flow (``create_quant_config``, ``quantize_model``, ``--calib-batches`` batches of 8,
  ``save_model``), timed from the first call to the last; layers quantized of those with weights, and why the
  rest are not (openamct's own capture, as its coverage log says); deploy and fake-quant models against the
  simulation on ``--fresh`` inputs it was not calibrated on (top-1 agreement over dim 1, max abs diff), and the
  simulation against itself with its inputs moved in the last float bit (how far last-bit differences alone move
  it: the closest any runtime can be expected to come);
- ORT: ``quant_pre_process`` + ``quantize_static`` (QDQ, per-channel, u8 activations, s8 weights, MinMax) on the
  same calibration inputs, timed, in this process;
- latency at batch 1 and 16, 2 threads: ``--rounds`` interleaved rounds of FP32, deploy, ORT, medians; and the
  ops each of deploy and ORT leaves float after ORT's optimisation (Conv/FusedConv/MatMul/Gemm/ConvTranspose).

Inputs: normal noise for the random-weight models, int64 token ids for BERT, ImageNet sample images (Lite0's
preprocessing) for the two Lite0s. Results go to ``--out``/zoo.json (after each model) and a table is printed.

Run by hand (not in CI), e.g. ``python benchmarks/zoo.py --rounds 5 --out /tmp/zoo``; one model, quickly:
``python benchmarks/zoo.py --models mobilenet_v3 --rounds 1 --out /tmp/zootest``.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime.quantization as oq
import torch

sys.path.insert(0, str(Path(__file__).parent))
from ortbaseline import integer_ops, ort_session
from zoo_models import ZOO

import openamct as amct
from openamct.amct.record import read_record
from openamct.app.data import ImageLoader, LabelledImages
from openamct.app.models import MODELS
from openamct.core.capture import capture
from openamct.onnx_export.parity import session

ROOT = Path(__file__).resolve().parents[1]
FLOAT_OPS = ("Conv", "FusedConv", "MatMul", "FusedMatMul", "Gemm", "ConvTranspose")
CALIB_BATCH = 8


def inputs(name: str, batches: int, offset: int, data: Path) -> list[tuple]:
    """`batches` batches of CALIB_BATCH inputs; real images (from image `offset` on) for the trained models."""
    zoo = ZOO[name]
    if not zoo.real_images:
        torch.manual_seed(1000 + offset)
        return [zoo.example(CALIB_BATCH, "full") for _ in range(batches)]
    images = LabelledImages(data / "images", MODELS["efficientnet_lite0"].preprocess,
                            limit=offset + batches * CALIB_BATCH)
    loader = iter(ImageLoader(images, batch_size=CALIB_BATCH))
    return [(x,) for x, _ in loader][offset // CALIB_BATCH:]


def fp32_files(model, example: tuple, out: Path) -> dict[str, str]:
    """Each way of writing the FP32 model this script knows, that works: name -> path."""
    import onnxslim

    dynamic = {"input": {0: "batch"}, "output": {0: "batch"}}
    files = {}
    for exporter, dynamo in (("torchscript", False), ("dynamo", True)):
        path = out / f"fp32_{exporter}.onnx"
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(model, example, str(path), dynamo=dynamo, opset_version=17, input_names=["input"],
                                  output_names=["output"], dynamic_axes=dynamic, external_data=False)
        except Exception as err:  # a model the exporter cannot take is reported, not fatal
            print(f"  {exporter} export failed: {type(err).__name__}: {str(err)[:200]}")
            continue
        files[exporter] = str(path)
        slim = out / f"fp32_{exporter}_onnxslim.onnx"
        onnx.save(onnxslim.slim(onnx.load(str(path))), str(slim))
        files[f"{exporter}+onnxslim"] = str(slim)
    with torch.no_grad():
        want = model(*example).numpy()
    for name, path in list(files.items()):  # a fast file with other outputs is no baseline (onnxslim's F.pad folding)
        got = session(path).run(None, {"input": example[0].numpy()})[0]
        error = float(np.abs(got - want).max() / np.abs(want).max())
        if error > 1e-3:
            print(f"  {name} discarded: its outputs differ from PyTorch by {error:.3g} (relative)")
            del files[name]
    return files


def latency(paths: dict[str, str], feed: tuple, rounds: int, warmup: int = 1, threads: int = 2) -> dict[str, float]:
    """Median ms per run of each model, interleaved: each round runs every model once."""
    sessions = {k: ort_session(p, threads, spin=False) for k, p in paths.items()}
    feeds = {k: {i.name: t.numpy() for i, t in zip(s.get_inputs(), feed)} for k, s in sessions.items()}
    times = collections.defaultdict(list)
    for r in range(warmup + rounds):
        for k, s in sessions.items():
            start = time.perf_counter()
            s.run(None, feeds[k])
            if r >= warmup:
                times[k].append((time.perf_counter() - start) * 1e3)
    return {k: float(np.median(v)) for k, v in times.items()}


def float_ops(path: str) -> dict[str, int]:
    ops = integer_ops(path)
    return {op: ops[op] for op in FLOAT_OPS if ops[op]}


def ort_quantize(fp32: str, calib: list[tuple], out: Path) -> dict:
    """ORT's pre-processing and quantize_static (QDQ, per-channel, u8/s8, MinMax) on the calibration batches."""
    class Reader(oq.CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calib)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"input": batch[0].numpy()}

    start = time.perf_counter()
    source, note = str(out / "ort_pre.onnx"), None
    try:
        oq.quant_pre_process(fp32, source)
    except Exception as err:
        source, note = fp32, f"pre-processing failed ({type(err).__name__}), quantized without it"
    path = str(out / "ort_int8.onnx")
    oq.quantize_static(source, path, Reader(), quant_format=oq.QuantFormat.QDQ, per_channel=True,
                       activation_type=oq.QuantType.QUInt8, weight_type=oq.QuantType.QInt8,
                       calibrate_method=oq.CalibrationMethod.MinMax)
    return {"path": path, "seconds": time.perf_counter() - start, "note": note}


def openamct_flow(model, calib: list[tuple], out: Path) -> tuple:
    """The AMCT flow, timed: (calibrated model, save_model's report, seconds)."""
    os.chdir(out)
    start = time.perf_counter()
    amct.create_quant_config("config.json", model, calib[0], batch_num=len(calib))
    qmodel = amct.quantize_model("config.json", "modified_model.onnx", "record.txt", model, calib[0],
                                 input_names=["input"], output_names=["output"],
                                 dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    with torch.no_grad():
        for batch in calib:
            qmodel(*batch)
    report = amct.save_model("modified_model.onnx", "record.txt", "zoo")
    return qmodel, report, time.perf_counter() - start


def agreement(qmodel, paths: dict, fresh: list[tuple]) -> dict:
    """Deploy and fake-quant models against the simulation on fresh inputs: top-1 agreement (over dim 1, every
    position) and max abs diff; the top-1 of a random-weight model on noise is what it is, not an accuracy.

    "self": the simulation against itself on the same inputs times (1 + 1e-7 noise), float inputs only. Where an
    activation rounding flips on a last-bit difference (which is all that ONNX Runtime's float kernels change), the
    flip can spread through the layers after it; this is how far that alone moves the simulation, so a runtime
    whose float arithmetic differs from PyTorch's in the last bit cannot be expected to come closer."""
    with torch.no_grad():
        want = np.concatenate([qmodel(*batch).numpy() for batch in fresh])
    result = {}
    if all(t.is_floating_point() for batch in fresh for t in batch):
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            moved = np.concatenate([qmodel(*(t * (1 + 1e-7 * torch.randn(t.shape, generator=generator))
                                              for t in batch)).numpy() for batch in fresh])
        result["self"] = {"top1_agreement": float((moved.argmax(1) == want.argmax(1)).mean()),
                          "max_abs_diff": float(np.abs(moved - want).max())}
    for kind, path in paths.items():
        sess = session(path, threads=2)
        got = np.concatenate([sess.run(None, {"input": batch[0].numpy()})[0] for batch in fresh])
        result[kind] = {"top1_agreement": float((got.argmax(1) == want.argmax(1)).mean()),
                        "max_abs_diff": float(np.abs(got - want).max()), "output_range": float(np.abs(want).max())}
    return result


def batch_of(calib: list[tuple], size: int) -> tuple:
    """The first `size` calibration inputs as one batch (latency does not depend on the values)."""
    return tuple(torch.cat([batch[i] for batch in calib])[:size] for i in range(len(calib[0])))


def run_model(name: str, args) -> dict:
    out = (args.out / name).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = ZOO[name].build("full")
    calib = inputs(name, args.calib_batches, 0, args.data)
    fresh = inputs(name, args.fresh // CALIB_BATCH, args.calib_batches * CALIB_BATCH, args.data)
    info = capture(model, calib[0])
    result = {"layers_with_weights": len(info.layers) + len(info.skipped), "not_quantized": dict(info.skipped)}

    candidates = fp32_files(model, tuple(t[:2] for t in calib[0]), out)
    speeds = latency(candidates, batch_of(calib, 16), rounds=3)
    fastest = min(speeds, key=speeds.get)
    result["fp32_candidates_b16_ms"], result["fp32"] = speeds, fastest
    print(f"  FP32 files at batch 16 (ms): {speeds}; fastest {fastest}")

    qmodel, report, seconds = openamct_flow(model, calib, out)
    result.update(openamct_seconds=seconds, layers_quantized=len(read_record(str(out / "record.txt"))))
    ort = ort_quantize(candidates[fastest], calib, out)
    result.update(ort_seconds=ort["seconds"], ort_note=ort["note"])
    result["parity"] = agreement(qmodel, report["paths"], fresh)
    paths = {"fp32": candidates[fastest], "deploy": report["paths"]["deploy"], "ort": ort["path"]}
    result["float_ops"] = {k: float_ops(p) for k, p in paths.items()}
    for batch in (1, 16):
        result[f"latency_b{batch}_ms"] = latency(paths, batch_of(calib, batch), args.rounds)
    return result


def table(results: dict) -> str:
    lines = ["| model | quantized / with weights | deploy vs sim top-1 / max diff | fake-quant max diff "
             "| sim vs itself, input x (1 + 1e-7 noise): top-1 / max diff "
             "| b1 ms FP32 / deploy / ORT | b16 ms FP32 / deploy / ORT | deploy vs FP32 b16 | ORT vs FP32 b16 "
             "| calib s openamct / ORT |", "|---" * 10 + "|"]
    for name, r in results.items():
        b1, b16 = r["latency_b1_ms"], r["latency_b16_ms"]
        deploy, fake = r["parity"]["deploy"], r["parity"]["fake_quant"]
        moved = r["parity"].get("self")
        itself = f"{100 * moved['top1_agreement']:.1f}% / {moved['max_abs_diff']:.3g}" if moved else "(integer input)"
        lines.append(
            f"| {name} | {r['layers_quantized']} / {r['layers_with_weights']} "
            f"| {100 * deploy['top1_agreement']:.1f}% / {deploy['max_abs_diff']:.3g} | {fake['max_abs_diff']:.3g} "
            f"| {itself} "
            f"| {b1['fp32']:.2f} / {b1['deploy']:.2f} / {b1['ort']:.2f} "
            f"| {b16['fp32']:.1f} / {b16['deploy']:.1f} / {b16['ort']:.1f} "
            f"| {b16['fp32'] / b16['deploy']:.2f}x | {b16['fp32'] / b16['ort']:.2f}x "
            f"| {r['openamct_seconds']:.1f} / {r['ort_seconds']:.1f} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(ZOO), help=f"comma list of {', '.join(ZOO)}")
    p.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds (medians)")
    p.add_argument("--calib-batches", type=int, default=2, help=f"calibration batches of {CALIB_BATCH}")
    p.add_argument("--fresh", type=int, default=32, help="fresh inputs for the parity figures")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "imagenet-sample")
    p.add_argument("--out", type=Path, default=Path("/tmp/zoo"))
    args = p.parse_args()
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.models.split(","):
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        results[name] = run_model(name, args)
        print(f"  {json.dumps(results[name])}\n  ({time.perf_counter() - start:.0f} s)", flush=True)
        (args.out / "zoo.json").write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
