"""Mixed precision (an openamct extension): per-layer weight formats chosen to meet an accuracy target at the
smallest weight size, or for the best accuracy under a size budget.

    result = openamct.mixed_precision(model, x, calibrate_fn, evaluate_fn, max_drop=1.0, options=("4", "8"))
    result.qmodel, result.choice      # the calibrated simulation model, {layer: "4" | "8" | "nuq16" | "float"}

The formats (`options`): "float" (the layer not quantized, AMCT's fallback), "8", "7", "6", "4" (uniform weights of
that many bits) and "nuqN" (an N-level NUQ codebook, on the Conv2d/Linear layers where nuq.size_rule says it
pays). Activations stay as the base config has them. Sizes are weight bytes at the format's storage width (packed
indices plus codebooks for NUQ, 4 bytes a weight in float; scales not counted), relative to every candidate layer
at INT8.

How:
1. The model is calibrated once per quantized format, every layer that can take it in it (the others at INT8),
   and each of these uniform models is scored with `evaluate_fn` (the curve's reference points).
2. Each layer's cost in each format is the change of the network's output loss against the float model
   (sensitivity.py, on a few calibration samples) when that layer alone takes the format, measured among the
   layers of the smallest uniform model that meets the target (or, with a budget, the smallest at least as large
   as it): there a layer's cost includes how its error compounds with its quantized neighbours'. Measured alone,
   among float layers, the costs add up to far less than the quantized network loses. Where no uniform model meets
   the target, they are measured alone all the same.
3. Taking these changes as additive, the configurations of least predicted loss for their size lie on a path from
   all-float to all-smallest: each layer's formats on the lower convex hull of its (bytes, loss) points, the
   steps of all layers taken in order of loss added per byte saved (the Lagrangian of the multiple-choice knapsack).
4. The path is checked with `evaluate_fn` on properly calibrated models: with `max_drop`, a binary search for the
   smallest configuration whose drop from the float model is within it, among those smaller than the uniform
   model that meets it (which is chosen where none does; about log2 of the path's length trials); with
   `size_budget`, the least-loss configuration within the budget.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

from torch import nn

from . import log
from .algorithms import nuq
from .api import calibrate, default_config, prepare, quant_layers
from .capture import capture
from .config import NUQ_TYPES, ConfigError, QuantConfig
from .reconstruction import float_parameters
from .sensitivity import SampleRecorder, layer_output_loss, swap_losses


def parse_option(option: str) -> str:
    """A format name, checked: "float", "4".."8" (bits the config allows) or "nuqN" (2 <= N <= 255)."""
    option = str(option).strip().lower()
    if option == "float" or option in ("4", "6", "7", "8"):
        return option
    if option.startswith("nuq") and option[3:].isdigit() and 2 <= int(option[3:]) <= 255:
        return option
    raise ConfigError(f"weight format {option!r}: expected float, 4, 6, 7, 8 or nuqN (N levels, 2..255)")


def option_bytes(option: str, shape, codebook: str = "auto") -> float:
    count = math.prod(shape)
    if option == "float":
        return 4.0 * count
    if option.startswith("nuq"):
        steps = int(option[3:])
        books = shape[0] if nuq.per_channel_codebooks(codebook, shape, steps) else 1
        return count * nuq.index_bits(steps) / 8 + books * steps
    return count * int(option) / 8


def applies(option: str, types: tuple, shape, codebook: str = "auto") -> bool:
    if option.startswith("nuq"):
        return bool(set(types) & set(NUQ_TYPES)) and nuq.size_rule(shape, int(option[3:]), codebook)
    return True


def with_formats(base: QuantConfig, choice: dict) -> QuantConfig:
    """`base` with each layer of `choice` in its format; the other layers as in `base`."""
    layers = dict(base.layers)
    for name, option in choice.items():
        layer = layers[name]
        if option == "float":
            layers[name] = dataclasses.replace(layer, quant_enable=False)
        elif option.startswith("nuq"):
            weight = dataclasses.replace(layer.weight, wts_algo="nuq_quantize", num_bits=8, num_steps=int(option[3:]))
            layers[name] = dataclasses.replace(layer, quant_enable=True, weight=weight)
        else:
            weight = dataclasses.replace(layer.weight, wts_algo="arq_quantize", num_bits=int(option))
            layers[name] = dataclasses.replace(layer, quant_enable=True, weight=weight)
    return dataclasses.replace(base, layers=layers)


def tradeoff_path(losses: dict, sizes: dict) -> list:
    """The configurations of least predicted loss for their size, from all-largest to all-smallest (see the module
    docstring): a list of {layer: format}. `losses`, `sizes`: layer -> {format: value}."""
    start, steps = {}, []
    for name, size in sizes.items():
        loss = losses[name]
        hull = []  # from the largest format down: strictly falling size, strictly rising loss, convex
        for option in sorted(size, key=lambda o: (-size[o], loss[o])):
            if hull and size[option] == size[hull[-1]]:
                continue  # as large as the one kept, and no better
            while hull and loss[option] <= loss[hull[-1]]:
                hull.pop()  # larger and no better than this one
            while len(hull) >= 2 and _slope(hull[-2], hull[-1], name, losses, sizes) >= \
                    _slope(hull[-1], option, name, losses, sizes):
                hull.pop()  # above the lower convex hull
            hull.append(option)
        start[name] = hull[0]
        steps += [(_slope(a, b, name, losses, sizes), name, b) for a, b in zip(hull, hull[1:])]
    path, current = [dict(start)], dict(start)
    for _, name, option in sorted(steps, key=lambda step: step[0]):
        current[name] = option
        path.append(dict(current))
    return path


def _slope(a: str, b: str, name: str, losses: dict, sizes: dict) -> float:
    """Loss added per byte saved going from format a to the smaller b."""
    saved = sizes[name][a] - sizes[name][b]
    return (losses[name][b] - losses[name][a]) / saved if saved > 0 else math.inf


@dataclass
class Trial:
    """One configuration scored with the evaluator: its size relative to INT8, predicted and measured results."""
    label: str
    size: float
    predicted_loss: float | None
    metric: float
    drop: float
    ok: bool | None
    seconds: float


@dataclass
class MixedPrecision:
    """The search's result: the calibrated model of the chosen configuration (None where no quantized configuration
    met the target), the choice, and what was measured on the way."""
    qmodel: nn.Module | None
    choice: dict
    config: QuantConfig | None
    original_metric: float
    trials: list = field(default_factory=list)
    losses: dict = field(default_factory=dict)  # layer -> {format: its output loss (see the module docstring)}
    chosen: str = ""  # the label of the chosen configuration's trial
    sizes: dict = field(default_factory=dict)   # layer -> {format: weight bytes}


def _context(uniform: dict, ratio, original: float, max_drop, size_budget) -> str | None:
    """The uniform format the layers are measured among: the smallest that meets `max_drop`, or the smallest at
    least `size_budget` large (the largest quantized format where none is), so that the configurations the search
    ends near are measured in about their own context. None (measured alone) where no uniform model meets
    `max_drop`: around a model that misses the target, one layer's change is lost in the error that misses it."""
    by_size = sorted(uniform, key=lambda option: ratio(uniform[option][1]))
    if max_drop is not None:
        return next((option for option in by_size if original - uniform[option][3] <= max_drop), None)
    return next((option for option in by_size if ratio(uniform[option][1]) >= size_budget), by_size[-1])


def _calibrated(model, config, calibrate_fn, input_data, samples: SampleRecorder | None = None):
    """prepare + calibrate, and the float weights taken in between."""
    qmodel = prepare(model, config, input_data)
    floats = float_parameters(quant_layers(qmodel))
    handle = qmodel.register_forward_pre_hook(samples) if samples is not None else None
    calibrate(qmodel, calibrate_fn)
    if handle is not None:
        handle.remove()
    return qmodel, floats


def mixed_precision(model: nn.Module, input_data, calibrate_fn, evaluate_fn, *, max_drop: float | None = None,
                    size_budget: float | None = None, options=("4", "8"),
                    base_config: QuantConfig | None = None) -> MixedPrecision:
    """Choose each layer's weight format among `options` (and "float"); see the module docstring.

    `calibrate_fn(qmodel)` runs the calibration batches; `evaluate_fn(model) -> float` scores a model, higher
    better (it gets the float model once, then calibrated simulations). Exactly one of `max_drop` (largest drop of
    the metric from the float model's) and `size_budget` (largest weight size relative to INT8) is given.
    `base_config` (default: default_config's W8A8) sets everything else; its skipped layers stay float."""
    if (max_drop is None) == (size_budget is None):
        raise ConfigError("mixed precision: give exactly one of max_drop and size_budget")
    if size_budget is not None and not size_budget > 0:
        raise ConfigError(f"size_budget: got {size_budget!r}, expected a ratio to INT8 > 0")
    options = sorted({parse_option(o) for o in options} - {"float"}, key=lambda o: -option_bytes(o, (1, 64)))
    if not options:
        raise ConfigError("mixed precision: no quantized weight format among the options")
    info = capture(model, input_data)
    base_config = base_config or default_config(model, input_data)
    candidates = base_config.enabled()
    modules = dict(model.named_modules())
    shapes = {name: tuple(modules[name].weight.shape) for name in candidates}
    codebook = {name: base_config.layers[name].weight.codebook for name in candidates}
    formats = {name: ["float"] + [o for o in options if applies(o, info.layers[name], shapes[name], codebook[name])]
               for name in candidates}
    sizes = {name: {o: option_bytes(o, shapes[name], codebook[name]) for o in formats[name]} for name in candidates}
    int8 = sum(option_bytes("8", shape) for shape in shapes.values())

    def ratio(choice):
        return sum(option_bytes(option, shapes[name], codebook[name]) for name, option in choice.items()) / int8

    started = time.perf_counter()
    original = float(evaluate_fn(model))
    log.info(f"Mixed precision: the float model scores {original:.4g}.", "MixedPrecision")
    result = MixedPrecision(None, {}, None, original, sizes=sizes)
    result.trials.append(Trial("float", ratio(dict.fromkeys(candidates, "float")), 0.0, original, 0.0, True,
                               time.perf_counter() - started))
    samples = SampleRecorder()
    uniform = {}  # format -> (calibrated model, its choice, its float weights, its metric)
    for option in options:
        started = time.perf_counter()
        choice = {name: option if option in formats[name] else "8" for name in candidates}
        qmodel, floats = _calibrated(model, with_formats(base_config, choice), calibrate_fn, input_data,
                                     samples if not samples.batches else None)
        metric = float(evaluate_fn(qmodel))
        uniform[option] = (qmodel, choice, floats, metric)
        result.trials.append(Trial(f"uniform {option}", ratio(choice), None, metric, original - metric,
                                   None if max_drop is None else original - metric <= max_drop,
                                   time.perf_counter() - started))
        log.info(f"Mixed precision: every layer at {option} (where it applies) scores {metric:.4g}, "
                 f"size {ratio(choice):.3f} of INT8.", "MixedPrecision")
    context = _context(uniform, ratio, original, max_drop, size_budget)
    if context is None:
        losses = {name: {"float": 0.0} for name in candidates}
        for option, (qmodel, _, floats, _) in uniform.items():
            names = [name for name in candidates if option in formats[name]]
            for name, loss in layer_output_loss(qmodel, floats, samples.batches, names,
                                                desc=f"sensitivity {option}").items():
                losses[name][option] = loss
    else:
        qmodel, choice, floats, _ = uniform[context]
        log.info(f"Mixed precision: each layer's formats measured among the others at {context}.", "MixedPrecision")
        alternatives = {name: {option: "float" if option == "float" else quant_layers(uniform[option][0])[name]
                               for option in formats[name] if option != choice[name]} for name in candidates}
        losses = swap_losses(qmodel, floats, alternatives, model, samples.batches,
                             desc=f"sensitivity among {context}")
        for name in candidates:
            losses[name][choice[name]] = 0.0
    anchor = (uniform[context][0], uniform[context][1], f"uniform {context}") \
        if context is not None and max_drop is not None else None
    del uniform, qmodel
    result.losses = losses
    path = tradeoff_path(losses, sizes)

    def predicted(choice):
        return sum(losses[name][option] for name, option in choice.items())

    def trial(index):
        started = time.perf_counter()
        choice = path[index]
        qmodel, _ = _calibrated(model, with_formats(base_config, choice), calibrate_fn, input_data)
        metric = float(evaluate_fn(qmodel))
        ok = max_drop is None or original - metric <= max_drop
        result.trials.append(Trial(f"path {index}/{len(path) - 1}", ratio(choice), predicted(choice), metric,
                                   original - metric, ok, time.perf_counter() - started))
        log.info(f"Mixed precision: path step {index} of {len(path) - 1}, size {ratio(choice):.3f} of INT8, "
                 f"predicted loss {predicted(choice):.4g}: scores {metric:.4g} (drop {original - metric:.4g})"
                 + ("" if ok else ", over the target"), "MixedPrecision")
        return (qmodel, choice, f"path {index}/{len(path) - 1}") if ok else None

    if size_budget is not None:
        fitting = [i for i, choice in enumerate(path) if ratio(choice) <= size_budget]
        if not fitting:
            raise ConfigError(f"size_budget {size_budget}: the smallest configuration of these formats is "
                              f"{ratio(path[-1]):.3f} of INT8")
        best = trial(fitting[0])
    else:  # the smallest path configuration below the anchor (the uniform context, or all float) that meets it
        limit = ratio(anchor[1]) if anchor is not None else math.inf
        smaller = [index for index, choice in enumerate(path) if ratio(choice) < limit]
        best, low, high = anchor, -1, len(smaller)  # smaller[low] meets the target, smaller[high] does not
        while high - low > 1:
            middle = (low + high) // 2
            found = trial(smaller[middle])
            if found is None:
                high = middle
            else:
                low, best = middle, found
    if best is not None:
        result.qmodel, result.choice, result.chosen = best
        result.config = with_formats(base_config, result.choice)
    return result
