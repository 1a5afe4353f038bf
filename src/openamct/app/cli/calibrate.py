"""`openamct calibrate`: AMCT's post-training flow (create_quant_config -> quantize_model -> batch_num calibration
batches -> save_model) in AMCT's sample layout under --output, then the FP32 and deploy ONNX models (and, on request,
the PyTorch simulation) evaluated on the same images, a report and a per-layer error plot."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ... import amct
from ...amct.amct_log import log_path
from ...amct.config_files import load_json
from ...core.api import is_calibrated, prepare, quant_layers
from ...core.capture import capture
from ...core.fileio import write_bytes, write_text
from ...core.reconstruction import float_parameters
from ...core.sensitivity import layer_output_loss
from ...onnx_export.fused import fused_model
from ...onnx_export.parity import describe
from ..data import ImageLoader
from ..evaluation import OnnxPredictor, TorchPredictor, evaluate
from ..html_report import plot_sensitivity, plot_tradeoff, write_html
from ..report import layer_errors, plot_layer_errors
from . import common, mixed

LAYER_ERROR_IMAGES = 4  # images of the first calibration batch the per-layer SQNR is measured on


SUMMARY = "quantize a model on calibration images, export it to ONNX and compare accuracies"
DESCRIPTION = """\
Quantize a model with AMCT's post-training flow and compare its accuracy before and after.

Steps: create_quant_config (from --config, else default W8A8 with --skip-layers and --batch-num)
-> quantize_model (BN folding, the fused ONNX model) -> calibration on the first batch_num x batch_size
images of --images -> save_model (deploy and fake-quant ONNX models) -> evaluation of the FP32 model (its BN-folded
ONNX export) and the deploy model in ONNX Runtime, and with --eval-simulation of the PyTorch
simulation, on the evaluation images (the first --eval images, by default all of them)."""


EPILOG = f"""\
outputs (NAME: --name, else the --model name or the FACTORY name; OUTPUT: --output, else outputs/NAME):
  OUTPUT/tmp/config.json               per-layer quantization config (create_quant_config)
  OUTPUT/tmp/record.txt                scales and offsets of every quantized layer
  OUTPUT/tmp/modified_model.onnx       BN-folded float model with the calibrated weights (save_model's input)
  OUTPUT/tmp/fp32_model.onnx           BN-folded FP32 model: the baseline the evaluation scores
  OUTPUT/NAME_deploy_model.onnx        INT8 QDQ model for deployment (ONNX Runtime, ATC)
  OUTPUT/NAME_fake_quant_model.onnx    float model simulating INT8 (same numbers as the deploy one)
  OUTPUT/quant_report.json             accuracies, parity, per-layer SQNR and sensitivity, paths and timings
  OUTPUT/quant_report.html             the same with its plots, one self-contained file for a browser
  OUTPUT/layer_error.png               per-layer quantization error (SQNR in dB, on the first
                                       {LAYER_ERROR_IMAGES} calibration images)
  ./amct_log/amct_pytorch.log          AMCT-format log of the run

example:
  openamct calibrate --model efficientnet_lite0 --images data/images --labels data/synsets.txt \\
      --batch-num 2 --batch-size 16 --eval 100"""


def add_parser(commands) -> None:
    calibrate = common.add_command(commands, "calibrate", SUMMARY, DESCRIPTION, EPILOG)
    common.model_arguments(calibrate, onnx=False)
    calibrate.add_argument("--name", metavar="NAME",
                           help="prefix of the exported files (default: the --model name or the FACTORY name)")
    common.data_arguments(calibrate, eval_help="evaluate on the first N images; 0 skips the evaluation "
                                         "(default: all images)", eval_min=0)
    quant = calibrate.add_argument_group("quantization")
    quant.add_argument("--output", metavar="DIR", help="output folder (default outputs/NAME)")
    quant.add_argument("--config", metavar="FILE.cfg",
                       help="AMCT simple config (protobuf text of calibration_config_pytorch.proto), passed as "
                            "config_defination; its batch_num replaces --batch-num, and skip_layers go in it "
                            "(not with --skip-layers)")
    quant.add_argument("--batch-num", type=common.positive, default=8, metavar="N",
                       help="calibration batches (default 8): the first N x --batch-size images calibrate")
    quant.add_argument("--skip-layers", metavar="A,B", default="",
                       help="comma-separated module names to keep in float (e.g. conv1,fc)")
    quant.add_argument("--block-reconstruction", type=common.positive, metavar="STEPS",
                       help="after calibration, reconstruct each block of the model with STEPS Adam steps per block "
                            "(openamct's block_reconstruction in config.json; for 4-bit and NUQ weights, e.g. 300; "
                            "minutes rather than seconds; default off)")
    mixed.add_arguments(calibrate.add_argument_group("mixed precision (instead of one config for every layer)"))
    calibrate.add_argument("--eval-simulation", action="store_true",
                           help="also evaluate the PyTorch simulation of the INT8 model (slow: float kernels plus "
                                "the quantization arithmetic; the deploy model agrees with it, see the parity check)")
    common.device_argument(calibrate)
    calibrate.set_defaults(func=run)


def run(args) -> int:
    start = time.perf_counter()
    timings = {}
    device = common.device(args.device)
    skip_layers = [name.strip() for name in args.skip_layers.split(",") if name.strip()]
    if skip_layers and args.config:
        raise common.UsageError("--skip-layers cannot be combined with --config: list them as skip_layers in the .cfg")
    if args.config and not os.path.isfile(args.config):
        raise common.UsageError(f"--config: file not found: {args.config}")
    formats = mixed.check(args) if mixed.requested(args) else None
    preprocess_name = common.preprocess_name(args)
    dataset = common.dataset(args, common.preprocessing(preprocess_name))
    if not args.config:  # else the .cfg's batch_num counts: checked once the config is written
        _check_calibration_images(dataset, args.batch_num, args)
    with common.timed(timings, "load_model"):
        model, model_name, input_shape = common.load_model(args)
    name = args.name or model_name
    output = Path(args.output or Path("outputs") / name)
    tmp = output / "tmp"
    common.check_output_folder(tmp, model)
    config_file, record_file, fused_file = tmp / "config.json", tmp / "record.txt", tmp / "modified_model.onnx"
    fp32_file = tmp / "fp32_model.onnx"
    model.to(device)
    input_data = torch.randn(input_shape, generator=torch.Generator().manual_seed(0)).to(device)

    with common.timed(timings, "quantize_model"):
        amct.create_quant_config(str(config_file), model, input_data, skip_layers=skip_layers,
                                 batch_num=1 if args.config else args.batch_num, config_defination=args.config)
        config = json.loads(config_file.read_text())
        if args.block_reconstruction:
            config["block_reconstruction"] = {"num_iteration": args.block_reconstruction}
            write_text(str(config_file), json.dumps(config, indent=4) + "\n")
        batch_num = config["batch_num"]
        _check_calibration_images(dataset, batch_num, args)
        calibration = dataset.subset(0, batch_num * args.batch_size)
        if any(isinstance(layer, dict) and "dmq_balancer_param" in layer for layer in config.values()):
            if formats is not None:
                raise common.UsageError(f"--config {args.config}: its dmq_balancer cannot be combined with --max-drop "
                                        f"or --size-budget yet (mixed precision does not balance): drop one of them")
            _balance(config_file, record_file, model, input_data, calibration, batch_num, args, device)
        io = dict(input_names=["input"], output_names=["output"],
                  dynamic_axes={"input": {0: "batch_size"}, "output": {0: "batch_size"}})
        qmodel = amct.quantize_model(str(config_file), str(fused_file), str(record_file), model, input_data, **io)
        fp32, _ = fused_model(qmodel, input_data, **io)
        write_bytes(str(fp32_file), fp32.SerializeToString())  # the FP32 baseline: BN folded, before calibration
    if not quant_layers(qmodel):
        raise common.UsageError(f"{name}: no layer to quantize (every Conv/Linear layer is skipped or unsupported; see "
                         f"{log_path()})")
    floats = float_parameters(quant_layers(qmodel))
    search = None
    if formats is not None:
        with common.timed(timings, "mixed_precision"):
            qmodel, final_config, search = mixed.search(args, formats, model, load_json(str(config_file)), dataset,
                                                        len(calibration), device, input_data)
        sample = next(iter(ImageLoader(calibration, LAYER_ERROR_IMAGES, 0)))[0]
        skipped = search.pop("skipped_images")
        calibration_skipped = sum(path in skipped for path in (str(p) for p, _ in calibration.samples))
        floats = float_parameters(quant_layers(prepare(model, final_config, input_data)))
    else:
        with common.timed(timings, "calibration"):
            sample, seen, skipped = _run_batches(calibration, qmodel, "calibrating", args, device)
        calibration_skipped = len(skipped)
        if not is_calibrated(qmodel):
            raise _too_few("calibration", seen, batch_num, skipped)

    with common.timed(timings, "save_model"):
        qmodel.cpu()  # save_model checks parity on CPU tensors
        if search is None:
            saved = amct.save_model(str(fused_file), str(record_file), str(output / name))
        else:
            saved = mixed.save(qmodel, final_config, {"config": str(config_file), "record": str(record_file),
                                                      "modified_model": str(fused_file)}, str(output / name),
                               sample, io)
        qmodel.to(device)

    with common.timed(timings, "layer_errors"):
        batch = sample.to(device)
        errors = layer_errors(model, qmodel, batch)
        isolated = layer_errors(None, qmodel, batch, isolated=True)
        plot_file = plot_layer_errors(errors, str(output / "layer_error.png"), isolated=isolated,
                                      title=f"{name}: per-layer quantization error (INT8 simulation vs FP32, "
                                            f"{len(sample)} images)")
        sensitivity = layer_output_loss(qmodel, floats, [batch])

    results = {}
    if args.eval != 0:
        evaluation = dataset.subset(0, args.eval) if args.eval else dataset
        predictors = {"fp32": OnnxPredictor(fp32_file, args.threads or 0)}
        if args.eval_simulation:
            predictors["simulation"] = TorchPredictor(qmodel, device)
        predictors["deploy"] = OnnxPredictor(saved["paths"]["deploy"], args.threads or 0)
        with common.timed(timings, "evaluation"):
            accuracy, seconds, top1, eval_skipped = evaluate(predictors, evaluation, args.batch_size, args.workers,
                                                              f"evaluating {', '.join(predictors)}")
        skipped += [path for path in eval_skipped if path not in skipped]
        timings.update({f"evaluation_{key}": round(value, 3) for key, value in seconds.items()})
        results = {"images": accuracy["fp32"].count,
                   "accuracy": {key: {"top1": acc.top1, "top5": acc.top5} for key, acc in accuracy.items()},
                   "top1_drop_points": {key: 100 * (accuracy["fp32"].top1 - accuracy[key].top1)
                                        for key in predictors if key != "fp32"},
                   "deploy_top1_agreement": {key: float((top1["deploy"] == top1[key]).mean())
                                             if len(top1["deploy"]) else None
                                             for key in predictors if key != "deploy"}}
    timings["total"] = round(time.perf_counter() - start, 3)

    paths = {"config": str(config_file), "record": str(record_file), "modified_model": str(fused_file),
             "fp32_model": str(fp32_file),
             "deploy_model": saved["paths"]["deploy"], "fake_quant_model": saved["paths"]["fake_quant"],
             "report": str(output / "quant_report.json"), "html_report": str(output / "quant_report.html"),
             "layer_error_plot": plot_file, "log": log_path()}
    if "nuq_weights" in saved["paths"]:
        paths["nuq_weights"] = saved["paths"]["nuq_weights"]
    report = {"model": name, "source": args.model or args.model_file, "weights": args.weights,
              "preprocess": preprocess_name, "device": str(device), "images": str(Path(args.images).resolve()),
              "labels": args.labels, "quantized_layers": len(quant_layers(qmodel)),
              "calibration": {"batch_num": batch_num, "batch_size": args.batch_size,
                              "images": len(calibration) - calibration_skipped},
              "evaluation": results, "skipped_images": skipped, "parity": saved["parity"],
              "layer_sqnr_db": errors, "layer_sqnr_db_isolated": isolated, "layer_output_loss_alone": sensitivity,
              "layers": _layers(model, input_data, qmodel, errors, isolated, sensitivity, saved["float_layers"]),
              "mixed_precision": search, "weight_bytes": saved["weight_bytes"],
              "fallbacks": {name: layer.fallback for name, layer in quant_layers(qmodel).items() if layer.fallback},
              "deployed_float": saved["float_layers"], "deploy_speed": saved["speed"],
              "paths": {key: os.path.abspath(value) for key, value in paths.items()}, "timings_s": timings}
    write_text(paths["report"], json.dumps(common.json_safe(report), indent=2) + "\n")
    _write_html(report, paths, sensitivity, name)
    _print_summary(report, args)
    return 0


def _layers(model, input_data, qmodel, errors, isolated, sensitivity, deployed_float) -> dict:
    """Every layer with weights: its weight format (or why it is not quantized, or deployed float), SQNR and output
    loss alone."""
    info = capture(model, input_data)
    layers = quant_layers(qmodel)
    rows = {}
    for name, types in info.layers.items():
        if name not in layers:
            rows[name] = {"type": types[0], "format": "float (config)"}
            continue
        params = layers[name].weight_quantizer.params
        weights = f"nuq{params.num_steps}" if params.nuq else f"INT{params.num_bits}"
        rows[name] = {"type": types[0], "format": f"float in the deploy model: {deployed_float[name]}"
                      if name in deployed_float else weights,
                      "SQNR dB": errors.get(name), "SQNR alone dB": isolated.get(name),
                      "output loss alone": sensitivity.get(name)}
    for name, reason in info.skipped.items():
        rows[name] = {"format": f"float: {reason}"}
    return rows


def _write_html(report, paths, sensitivity, name) -> None:
    """quant_report.html: the report with its plots embedded."""
    plots = {}
    search = report["mixed_precision"]
    if search:
        points = [{**t, "chosen": t["label"] == search["chosen"]} for t in search["trials"]]
        plots["Accuracy against weight size (search images)"] = plot_tradeoff(
            points, metric="metric", ylabel=f"top-1 (%) on the {search['search_images']} search images",
            title=f"{name}: configurations tried")
    if sensitivity:
        plots["Per-layer sensitivity: output loss with the layer quantized alone"] = plot_sensitivity(
            sensitivity, title=f"{name}: what each layer's quantization costs the output, alone")
    with open(paths["layer_error_plot"], "rb") as f:
        plots["Per-layer SQNR"] = f.read()
    write_html(common.json_safe(report), paths["html_report"], plots=plots)


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
        labels = {"fp32": "FP32 (ORT, BN folded)", "simulation": "INT8 simulation (PyTorch)",
                  "deploy": "INT8 deploy (ORT)"}
        for key, label in labels.items():
            if key not in results["accuracy"]:
                continue
            acc = results["accuracy"][key]
            drop = f"{results['top1_drop_points'][key]:>9.2f} pts" if key != "fp32" else ""
            out.append(f"  {label:<27}{100 * acc['top1']:>7.2f}%{100 * acc['top5']:>8.2f}%{drop}")
        for key, agreement in results["deploy_top1_agreement"].items():
            if agreement is not None:
                out.append(f"  deploy and {'FP32' if key == 'fp32' else key} agree on the top-1 class of "
                           f"{100 * agreement:.1f}% of the images")
    speed = report["deploy_speed"]
    if speed:
        out.append(f"\nONNX Runtime on the first calibration batch: deploy model {speed['deploy_ms']:.3g} ms, float "
                   f"model {speed['float_ms']:.3g} ms ({speed['float_ms'] / speed['deploy_ms']:.2f}x)")
    if report["parity"]:
        out.append("\nParity with the PyTorch simulation (first calibration batch):")
        out += [f"  {describe(kind, result)}" for kind, result in report["parity"].items()]
    errors = {k: v for k, v in report["layer_sqnr_db"].items()}
    if errors:
        worst = sorted(errors, key=lambda k: errors[k])[:3]
        out.append(f"\nPer-layer SQNR: median {np.median(list(errors.values())):.1f} dB; lowest: "
                   + ", ".join(f"{k} {errors[k]:.1f} dB" for k in worst))
    out.append("\nOutputs:")
    labels = {"config": "quant config", "record": "record", "modified_model": "fused float model",
              "fp32_model": "FP32 model",
              "deploy_model": "deploy model", "fake_quant_model": "fake-quant model", "report": "report",
              "html_report": "HTML report", "layer_error_plot": "layer error plot", "nuq_weights": "NUQ packed weights",
              "log": "log"}
    for key, label in labels.items():
        if key in report["paths"]:
            out.append(f"  {label:<18} {report['paths'][key]}")
    for name, why in report["fallbacks"].items():
        out.append(f"\nWarning: layer {name}: {why}")
    for name, why in report["deployed_float"].items():
        out.append(f"\nLayer {name} is float in the deploy model: {why}")
    out.append(f"\nSkipped images: {len(report['skipped_images'])}")
    for path in report["skipped_images"][:10]:
        out.append(f"  {path}")
    timings = report["timings_s"]
    parts = [f"{key.replace('_', ' ')} {value:.1f} s" for key, value in timings.items()
             if key != "total" and not key.startswith("evaluation_")]
    out.append(f"Total time: {timings['total']:.1f} s ({', '.join(parts)})")
    print("\n".join(out), flush=True)


def _balance(config_file, record_file, model, input_data, calibration, batch_num: int, args, device) -> None:
    """AMCT's DMQ pre-pass (quantize_preprocess) over the calibration batches, where the .cfg balances layers: it
    writes the balance factors to the record that quantize_model then reads."""
    balancing = amct.quantize_preprocess(str(config_file), str(record_file), model, input_data)
    _, seen, skipped = _run_batches(calibration, balancing, "DMQ balancing", args, device)
    if seen < batch_num:
        raise _too_few("DMQ balancing", seen, batch_num, skipped)


def _run_batches(calibration, forward, desc: str, args, device) -> tuple:
    """`forward` on each batch of the calibration images, with a progress bar: (the first batch's first
    LAYER_ERROR_IMAGES images, the batches run, the unreadable images skipped)."""
    loader = ImageLoader(calibration, args.batch_size, args.workers)
    first, seen = None, 0
    with torch.no_grad():
        for images, _ in tqdm(loader, total=len(loader), desc=desc, unit="batch", dynamic_ncols=True):
            if first is None:
                first = images[:LAYER_ERROR_IMAGES]
            forward(images.to(device))
            seen += 1
    return first, seen, list(loader.skipped)


def _too_few(stage: str, seen: int, batch_num: int, skipped: list) -> common.UsageError:
    return common.UsageError(f"{stage} got {seen} of {batch_num} batches ({len(skipped)} unreadable images "
                             f"skipped): add images or lower --batch-num")


def _check_calibration_images(dataset, batch_num, args) -> None:
    if len(dataset) <= (batch_num - 1) * args.batch_size:
        raise common.UsageError(f"calibration needs {batch_num} batches of {args.batch_size} images, but {args.images} "
                         f"has only {len(dataset)} images: lower --batch-num or --batch-size")
