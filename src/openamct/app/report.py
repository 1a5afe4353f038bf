"""Per-layer quantization error of a calibrated simulation model, and a bar chart of it.

    errors = layer_errors(model, qmodel, batch)       # {"conv1": 31.2, "layer1.0.conv1": 27.9, ...} (dB)
    plot_layer_errors(errors, "out/layer_error.png")

The error of a layer is the SQNR (signal-to-quantization-noise ratio, in dB) of its output in the simulation
against the float output of the same layer: 10 * log10(sum(ref ** 2) / sum((ref - quantized) ** 2)). Higher is
better; each 6 dB is about one bit. By default the simulation runs end to end, so a layer's error includes what
the quantized layers before it contributed (what the deployed model sees); with `isolated=True` each quantized
layer is fed the float model's own input instead, which shows the error that layer adds by itself.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..core.capture import capture
from ..core.fileio import atomic_path
from ..core.layer import QuantLayer
from ..core.sensitivity import as_output
from ..onnx_export.fused import float_copy


def sqnr_db(reference: torch.Tensor, value: torch.Tensor) -> float:
    """10 * log10(signal power / noise power); inf when `value` equals `reference`."""
    reference = reference.detach().float()
    noise = (reference - value.detach().float().to(reference.device)).pow(2).sum().item()
    signal = reference.pow(2).sum().item()
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10 * math.log10(signal / noise)


def _outputs(model: nn.Module, names, batch) -> dict:
    """The first output of each module in `names` during one forward of `model` on `batch`, in call order."""
    captured = {}

    def keep(name):
        def hook(module, args, output):
            if isinstance(output, torch.Tensor):
                captured.setdefault(name, output.detach())
        return hook

    _run_with_hooks(model, {name: keep(name) for name in names}, batch)
    return captured


def _run_with_hooks(model: nn.Module, hooks: dict, batch) -> None:
    """One forward of `model` on `batch` with forward hooks on the named modules (those that exist)."""
    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(hook) for name, hook in hooks.items() if name in modules]
    try:
        with torch.no_grad():
            model(*_as_tuple(batch))
    finally:
        for handle in handles:
            handle.remove()


def _as_tuple(batch):
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def _references(fp32_model: nn.Module, qmodel: nn.Module, layers, batch) -> dict:
    """Layer name -> name of the fp32 module whose output is the float version of that layer's output.

    A BN folded into a conv is an nn.Identity in qmodel: the conv's quantized output then corresponds to the
    BatchNorm's output in the fp32 model.
    """
    first = tuple(t[:1] for t in _as_tuple(batch))
    pairs = capture(fp32_model, first).bn_pairs
    modules = dict(qmodel.named_modules())
    return {name: pairs[name] if isinstance(modules.get(pairs.get(name)), nn.Identity) else name for name in layers}


def layer_errors(fp32_model: nn.Module | None, qmodel: nn.Module, batch, *, isolated: bool = False) -> dict:
    """SQNR in dB of each quantized layer's output in `qmodel` (a calibrated simulation), in execution order.

    `batch`: the model input (a tensor, or a tuple of them) on the models' device. The float reference is
    `fp32_model` (the user's model, BatchNorms unfolded) or, when it is None or `isolated` is true, the BN-folded
    float copy of `qmodel` (same names, same folding; only quantization differs). Layers the batch does not
    reach are left out. Neither model is changed.
    """
    layers = [name for name, m in qmodel.named_modules() if isinstance(m, QuantLayer)]
    if not layers:
        raise ValueError("layer_errors: qmodel has no quantized layers (is it the model quantize_model returned?)")
    was_training = qmodel.training
    qmodel.eval()
    try:
        if isolated:
            return _isolated_errors(qmodel, layers, batch)
        quantized = _outputs(qmodel, layers, batch)
    finally:
        qmodel.train(was_training)
    if fp32_model is None:
        reference_model, names = float_copy(qmodel).eval(), {name: name for name in layers}
    else:
        reference_model, names = fp32_model, _references(fp32_model, qmodel, layers, batch)
    was_training = reference_model.training
    reference_model.eval()
    try:
        reference = _outputs(reference_model, set(names.values()), batch)
    finally:
        reference_model.train(was_training)
    layers = dict(qmodel.named_modules())
    return {name: sqnr_db(as_output(layers[name], reference[names[name]]), value) for name, value in quantized.items()
            if names[name] in reference}



def _isolated_errors(qmodel: nn.Module, layers, batch) -> dict:
    """Each QuantLayer run on the float copy's input to that layer, against the float layer's output."""
    model = float_copy(qmodel).eval()
    quant = dict(qmodel.named_modules())
    errors = {}

    def compare(name):
        def hook(module, args, output):
            if name not in errors and isinstance(output, torch.Tensor):
                errors[name] = sqnr_db(as_output(quant[name], output), quant[name](*args))
        return hook

    _run_with_hooks(model, {name: compare(name) for name in layers}, batch)
    return errors


def plot_layer_errors(errors: dict, path: str, *, isolated: dict | None = None, title: str | None = None) -> str:
    """Save a bar chart of `errors` (layer -> SQNR dB, in execution order) as a PNG at `path`, atomically.

    `isolated` (same form) is drawn as markers over the bars. Infinite values (no error) are drawn at the top
    of the axis. Returns `path`.
    """
    import matplotlib
    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    names = list(errors)
    if not names:
        raise ValueError("plot_layer_errors: no layers to plot")
    finite = [v for d in (errors, isolated or {}) for v in d.values() if math.isfinite(v)]
    top = max(finite + [0.0]) + 5
    bottom = min(finite + [0.0])

    def shown(value):
        return top if value == math.inf else bottom if value == -math.inf else value

    width = min(max(6.0, 0.16 * len(names) + 2.0), 40.0)
    figure = Figure(figsize=(width, 4.8), dpi=100)
    axes = figure.add_subplot()
    positions = range(len(names))
    axes.bar(positions, [shown(errors[n]) for n in names], color="tab:blue", label="end to end (cumulative)")
    if isolated:
        marked = [i for i, n in enumerate(names) if n in isolated]
        axes.scatter(marked, [shown(isolated[names[i]]) for i in marked], color="tab:orange", marker="_", s=220,
                     linewidths=2, zorder=3, label="layer alone (isolated)")
    axes.set_xticks(list(positions))
    axes.set_xticklabels(names, rotation=90, fontsize=6 if len(names) > 40 else 8)
    axes.set_xlim(-0.7, len(names) - 0.3)
    low = min(bottom, 0.0)
    axes.set_ylim(low, top + 0.2 * (top - low))  # headroom for the legend
    axes.set_ylabel("SQNR (dB), higher is better")
    axes.set_title(title or "Per-layer quantization error: INT8 simulation vs float", fontsize=10)
    axes.grid(axis="y", alpha=0.3)
    axes.legend(loc="upper right", ncols=2, fontsize=8, framealpha=0.9)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    return path


__all__ = ["layer_errors", "plot_layer_errors", "sqnr_db"]
