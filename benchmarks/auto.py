"""Accuracy-driven quantization on EfficientNet-Lite0: AMCT's accuracy_based_auto_calibration and openamct's
mixed precision, each searching with an evaluator on images the final score never uses.

Images (the sample set, in file order): calibration 0-255 (8 batches of 32), the search's evaluator 256-543, the
final models scored on 544-799, which neither calibration nor the search saw. Every gap is to the FP32 model on
the same images, with its paired standard error.

- ``amct``: accuracy_based_auto_calibration with a ``--target``-point top-1 loss allowed, once per sensitivity
  (AMCT's CosineSimilarity and openamct's OutputLoss), every layer's weights at ``--amct-bits``: layers left
  float, the deploy model's top-1 (ONNX Runtime).
- ``mixed``: openamct.mixed_precision with ``--max-drop`` over ``--formats``: every configuration it scored (the
  uniform ones and the path's), with its weight size relative to INT8 and its top-1 on both image sets; the
  accuracy-vs-size plot goes to ``--plot``.

Run by hand (not in CI): ``python benchmarks/auto.py --data ../shared/data/imagenet-sample --out /tmp/auto``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import openamct as amct  # noqa: E402
from openamct.app.data import ImageLoader, LabelledImages, top1_gap  # noqa: E402
from openamct.app.evaluation import OnnxPredictor, TorchPredictor, logits  # noqa: E402
from openamct.app.html_report import plot_tradeoff  # noqa: E402
from openamct.app.models import MODELS  # noqa: E402
from openamct.core.api import quant_layers  # noqa: E402

MODEL = "efficientnet_lite0"
IO = dict(input_names=["input"], output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
CALIBRATION, SEARCH, FINAL = slice(0, 256), slice(256, 544), slice(544, 800)
BATCH = 32


def load(data: Path):
    dataset = LabelledImages(data / "images", MODELS[MODEL].preprocess, labels=data / "synsets.txt")
    xs, ys = zip(*ImageLoader(dataset, batch_size=BATCH, workers=2))
    return torch.cat(xs), torch.cat(ys).numpy()


def top1(scores: np.ndarray, labels: np.ndarray) -> float:
    return 100 * float((scores.argmax(1) == labels).mean())


class Evaluator(amct.AutoCalibrationEvaluatorBase):
    """Calibrates on images 0-255, scores top-1 on 256-543; `target`: top-1 points the search may lose. A calibrated
    model is scored as its fake-quant ONNX model in ONNX Runtime (bit-exact with the simulation, and many times
    faster on a CPU). The first `final_for` models evaluated are also scored on 544-799 (their logits in `final`)."""

    def __init__(self, images, labels, target, work: Path, final_for: int = 0):
        self.images, self.labels, self.target, self.work = images, labels, target, work
        self.final, self.final_for, self.calls = [], final_for, 0

    def calibration(self, model):
        with torch.no_grad():
            for start in range(CALIBRATION.start, CALIBRATION.stop, BATCH):
                model(self.images[start:start + BATCH])

    def predictor(self, model, kind: str = "fake_quant"):
        if not quant_layers(model):
            return TorchPredictor(model)
        paths = amct.export(model, str(self.work / "trial"), self.images[:2], check=False, **IO)["paths"]
        return OnnxPredictor(paths[kind])

    def evaluate(self, model):
        predictor = self.predictor(model)
        self.calls += 1
        if len(self.final) < self.final_for:
            self.final.append(logits(predictor, self.images[FINAL], BATCH))
        return top1(logits(predictor, self.images[SEARCH], BATCH), self.labels[SEARCH])

    def metric_eval(self, original, new):
        return original - new <= self.target, original - new


def gap_row(final_logits, fp32_final, labels) -> dict:
    gap = top1_gap(final_logits, fp32_final, labels[FINAL])
    return {"top1_final": top1(final_logits, labels[FINAL]), "gap": gap["gap"], "se": gap["se"]}


def run_amct(model, x, images, labels, fp32_final, out: Path, target: float, sensitivity: str, bits: int) -> dict:
    work = out / f"amct_w{bits}_{sensitivity}"
    work.mkdir(parents=True, exist_ok=True)
    cwd = os.getcwd()
    os.chdir(work)
    try:
        started = time.perf_counter()
        amct.create_quant_config("tmp/config.json", model, x, batch_num=CALIBRATION.stop // BATCH)
        if bits != 8:  # as a user would: every layer's weights at `bits` in the JSON config
            config = json.loads(Path("tmp/config.json").read_text())
            for layer in config.values():
                if isinstance(layer, dict) and "weight_quant_params" in layer:
                    layer["weight_quant_params"]["num_bits"] = bits
            Path("tmp/config.json").write_text(json.dumps(config, indent=4))
        evaluator = Evaluator(images, labels, target, work)
        amct.accuracy_based_auto_calibration(model, evaluator, "tmp/config.json", "tmp/record.txt",
                                             "results/lite0", x, sensitivity=sensitivity, **IO)
        seconds = time.perf_counter() - started
        final_config = work / "results" / "accuracy_based_auto_calibration_final_config.json"
        row = {"search": f"AMCT auto-calibration, W{bits}A8 ({sensitivity}, {target} pts)", "seconds": seconds,
               "evaluations": evaluator.calls}
        if not final_config.exists():
            return {**row, "model": None}
        config = json.loads(final_config.read_text())
        row["float_layers"] = sorted(k for k, v in config.items() if isinstance(v, dict) and not v["quant_enable"])
        deploy = OnnxPredictor(str(work / "results" / "lite0_deploy_model.onnx"))
        return {**row, **gap_row(logits(deploy, images[FINAL], BATCH), fp32_final, labels)}
    finally:
        os.chdir(cwd)


def run_mixed(model, x, images, labels, fp32_final, max_drop: float, formats, out: Path, plot: Path) -> dict:
    evaluator = Evaluator(images, labels, max_drop, out, final_for=1 + len(formats))  # the float and uniform models
    started = time.perf_counter()
    result = amct.mixed_precision(model, x, evaluator.calibration, evaluator.evaluate, max_drop=max_drop,
                                  options=formats,
                                  base_config=amct.default_config(model, x, batch_num=CALIBRATION.stop // BATCH))
    seconds = time.perf_counter() - started
    trials = [{"label": t.label, "size": t.size, "top1_search": t.metric, "ok": t.ok, "seconds": t.seconds,
               "predicted_loss": t.predicted_loss} for t in result.trials]
    for trial, final in zip(trials, evaluator.final):
        trial.update(gap_row(final, fp32_final, labels))
    row = {"search": f"mixed precision ({','.join(formats)}, max drop {max_drop})", "seconds": seconds,
           "evaluations": evaluator.calls, "trials": trials}
    if result.qmodel is not None:
        chosen = next(t for t in trials if t["label"] == result.chosen)
        chosen["label"] += " (chosen)"
        chosen["chosen"] = True
        chosen.update(gap_row(logits(evaluator.predictor(result.qmodel), images[FINAL], BATCH), fp32_final, labels))
        deploy = logits(evaluator.predictor(result.qmodel, "deploy"), images[FINAL], BATCH)
        row["chosen_deploy"] = gap_row(deploy, fp32_final, labels)
        row["formats"] = {option: list(result.choice.values()).count(option)
                          for option in sorted(set(result.choice.values()))}
        row["choice"] = result.choice
    plot_tradeoff([t for t in trials if "top1_final" in t], str(plot),
                  title=f"{MODEL}: top-1 on images 544-799 (never searched on) against weight size")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "imagenet-sample")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--searches", default="amct,mixed")
    parser.add_argument("--target", type=float, default=0.1, help="AMCT search: top-1 points it may lose")
    parser.add_argument("--sensitivities", default="CosineSimilarity,OutputLoss")
    parser.add_argument("--amct-bits", type=int, default=8, help="AMCT search: weight bits of every layer")
    parser.add_argument("--max-drop", type=float, default=1.0)
    parser.add_argument("--formats", default="4,8,nuq16,nuq32")
    parser.add_argument("--plot", type=Path, help="accuracy-vs-size plot (default OUT/tradeoff.png)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # the searches' progress
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    images, labels = load(args.data)
    model = MODELS[MODEL].build(None)
    x = images[:1].clone()
    fp32_final = logits(TorchPredictor(model), images[FINAL], BATCH)
    report = {"fp32_top1_final": top1(fp32_final, labels[FINAL]), "fp32_top1_search": top1(
        logits(TorchPredictor(model), images[SEARCH], BATCH), labels[SEARCH]), "rows": []}
    searches = args.searches.split(",")
    if "amct" in searches:
        for sensitivity in args.sensitivities.split(","):
            report["rows"].append(run_amct(model, x, images, labels, fp32_final, args.out, args.target, sensitivity,
                                           args.amct_bits))
            print(json.dumps(report["rows"][-1]), flush=True)
    if "mixed" in searches:
        report["rows"].append(run_mixed(model, x, images, labels, fp32_final, args.max_drop,
                                        args.formats.split(","), args.out, args.plot or args.out / "tradeoff.png"))
        print(json.dumps(report["rows"][-1], indent=1), flush=True)
    (args.out / "auto.json").write_text(json.dumps(report, indent=2) + "\n")
    print_tables(report)


def print_tables(report: dict) -> None:
    print(f"\nFP32 top-1: {report['fp32_top1_final']:.2f} % on images 544-799, {report['fp32_top1_search']:.2f} % "
          f"on 256-543 (the search's)")
    print("\n| search | float layers | top-1 544-799 | gap (s.e.) | evaluations | time |\n|---|---|---|---|---|---|")
    for row in report["rows"]:
        if "trials" in row:
            continue
        if row.get("model", True) is None:
            print(f"| {row['search']} | all (no model) | | | {row['evaluations']} | {row['seconds']:.0f} s |")
            continue
        print(f"| {row['search']} | {len(row['float_layers'])} | {row['top1_final']:.2f} | {row['gap']:+.2f} "
              f"({row['se']:.2f}) | {row['evaluations']} | {row['seconds']:.0f} s |")
    for row in report["rows"]:
        if "trials" not in row:
            continue
        print(f"\n{row['search']}: {row['seconds']:.0f} s, {row['evaluations']} evaluations; chosen formats "
              f"{row.get('formats')}; the chosen deploy model: {row.get('chosen_deploy')}")
        print("| configuration | size vs INT8 | top-1 256-543 | top-1 544-799 | gap to FP32 (s.e.) | within target "
              "| time |\n|---|---|---|---|---|---|---|")
        for t in row["trials"]:
            final = f"{t['top1_final']:.2f} | {t['gap']:+.2f} ({t['se']:.2f})" if "top1_final" in t else " | "
            print(f"| {t['label']} | {t['size']:.3f} | {t['top1_search']:.2f} | {final} | {t['ok']} | "
                  f"{t['seconds']:.0f} s |")


if __name__ == "__main__":
    main()
