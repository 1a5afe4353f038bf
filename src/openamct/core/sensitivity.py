"""How much each quantized layer costs: per-layer sensitivity of a calibrated simulation model.

Two measures, both on a few model inputs (`samples`, e.g. calibration batches):

- `layer_cosine`, AMCT's: each layer's quantized output against its float output on the same (float) input, as
  0.5 + 0.5 * cosine similarity (1: identical; lower: more sensitive). It is cheap (one float forward and each
  layer once), but it sees a layer's output rather than what the user measures: a layer whose error the rest of
  the network amplifies, or ignores, ranks where its own output puts it.
- `layer_output_loss`, openamct's: the network's output when only that layer is quantized (every other layer on
  its float weights, unquantized), against the float model's output: the KL divergence of the softmax for a
  classifier's (N, classes) logits, else the output's squared error relative to its power (`output_loss`). That is
  what quantizing the layer does to the result, alone, so the losses of the layers roughly add up and can be
  traded against size. It costs one forward per layer. The model is not traced, so the float prefix before a
  layer is not cached: on a CPU, a few dozen samples keep it to seconds per layer.
- `swap_losses`: the same output loss, but with the other layers quantized (core/mixed_precision.py): the change
  when one layer alone takes another format, where the errors of its neighbours compound with its own.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .api import quant_layers
from .block_learning import Overrides
from .reconstruction import float_model
from .simulation import layer_by_layer

COSINE_CHUNK = 4  # samples per float forward whose layer inputs are kept for layer_cosine
SAMPLES = 32  # calibration samples the sensitivities are measured on by default (SampleRecorder)


def _as_tuple(batch) -> tuple:
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def _first_tensor(output) -> torch.Tensor:
    """The first tensor of a model's output (a tensor, a tuple or list, or a dict of them)."""
    if isinstance(output, torch.Tensor):
        return output
    values = output.values() if isinstance(output, dict) else output
    return next(_first_tensor(v) for v in values if isinstance(v, (torch.Tensor, tuple, list, dict)))


class SampleRecorder:
    """A forward pre-hook (register it on the calibration model) keeping the first `count` samples of the
    calibration inputs, for measuring sensitivities after calibration."""

    def __init__(self, count: int = SAMPLES):
        self.batches, self.count, self.wanted = [], 0, count

    def __call__(self, module, args):
        if self.count < self.wanted and args and isinstance(args[0], torch.Tensor):
            take = self.wanted - self.count
            self.batches.append(tuple(a[:take].detach().clone() if isinstance(a, torch.Tensor) else a for a in args))
            self.count += len(args[0][:take])


def as_output(layer, value: torch.Tensor) -> torch.Tensor:
    """The float `value` of a QuantLayer's output as the layer outputs it: through the ReLU/clip that follows it,
    where its output quantizer comes after that clip (as the deployed integer kernel does)."""
    quantizer = layer.output_quantizer
    return value if quantizer is None else torch.clamp(value, *quantizer.bounds)


def output_loss(reference: torch.Tensor, output: torch.Tensor) -> float:
    """KL(softmax(reference) || softmax(output)) averaged over the rows of a (N, classes) output; else the squared
    error relative to the reference's power. 0 when they are equal; larger is worse."""
    reference, output = reference.detach().double(), output.detach().double().to(reference.device)
    if reference.dim() == 2 and reference.shape[1] > 1:
        return float(F.kl_div(F.log_softmax(output, 1), F.log_softmax(reference, 1), log_target=True,
                              reduction="batchmean"))
    power = reference.pow(2).sum()
    return float((reference - output).pow(2).sum() / power) if power > 0 else float((output != 0).any())


def cosine_similarity(reference: torch.Tensor, output: torch.Tensor) -> float:
    """AMCT's similarity: 0.5 + 0.5 * cos(reference, output) over the flattened tensors; 1 where the reference is
    all zeros (nothing to lose), 0 where only the output is."""
    reference, output = reference.detach().double().flatten(), output.detach().double().flatten()
    if not reference.any():
        return 1.0
    if not output.any():
        return 0.0
    return 0.5 + 0.5 * float(F.cosine_similarity(reference, output.to(reference.device), dim=0))


def floating(qmodel: nn.Module, floats: dict, names) -> Overrides:
    """Within a `with`, the quantized layers `names` run on their float weight and bias, unquantized."""
    layers = quant_layers(qmodel)
    return float_model({name: layers[name] for name in names}, floats)


def _outputs(qmodel: nn.Module, samples: list) -> list:
    """The model's output on each sample, layer_by_layer: with all layers but one float, the simulation's
    sharing of quantized values changes next to nothing and costs most of the time."""
    with torch.no_grad(), layer_by_layer():
        return [_first_tensor(qmodel(*_as_tuple(batch))) for batch in samples]


def _mean_loss(references: list, outputs: list) -> float:
    return sum(output_loss(r, o) for r, o in zip(references, outputs)) / len(references)


def _chunks(samples: list, size: int):
    """The samples (model inputs) in batches of at most `size`."""
    for batch in samples:
        batch = _as_tuple(batch)
        for start in range(0, len(batch[0]), size):
            yield tuple(a[start:start + size] if isinstance(a, torch.Tensor) else a for a in batch)


def layer_cosine(qmodel: nn.Module, floats: dict, samples: list, compare=cosine_similarity) -> dict:
    """Layer name -> AMCT's similarity of the layer's quantized output to its float output, both on the float
    model's input to the layer (so a layer is not blamed for the error of the layers before it), averaged over
    the samples; `compare(float, quantized)` can replace the similarity. The quantized layers run after each
    float forward, outside the simulation, on a few samples at a time so the inputs kept stay small."""
    layers = quant_layers(qmodel)
    totals, counts, seen = dict.fromkeys(layers, 0.0), dict.fromkeys(layers, 0), {}

    def keep(name):
        def hook(module, args, output):
            seen.setdefault(name, (args[0].detach(), output.detach()))
        return hook

    handles = [layer.register_forward_hook(keep(name)) for name, layer in layers.items()]
    try:
        for chunk in _chunks(samples, COSINE_CHUNK):
            seen.clear()
            with floating(qmodel, floats, list(layers)):
                _outputs(qmodel, [chunk])
            with torch.no_grad():
                for name, (x, reference) in seen.items():
                    totals[name] += compare(as_output(layers[name], reference), layers[name](x))
                    counts[name] += 1
    finally:
        for handle in handles:
            handle.remove()
    return {name: totals[name] / counts[name] for name in layers if counts[name]}


def layer_output_loss(qmodel: nn.Module, floats: dict, samples: list, names=None, *, desc="sensitivity") -> dict:
    """Layer name -> output_loss of the network with only that layer quantized, averaged over `samples`; for
    `names` (default: every quantized layer)."""
    layers = quant_layers(qmodel)
    names = list(layers) if names is None else list(names)
    with floating(qmodel, floats, list(layers)):
        references = _outputs(qmodel, samples)
    losses = {}
    for name in tqdm(names, desc=desc, unit="layer", leave=False, disable=len(names) < 8):
        with floating(qmodel, floats, [other for other in layers if other != name]):
            losses[name] = _mean_loss(references, _outputs(qmodel, samples))
    return losses


def swap_losses(qmodel: nn.Module, floats: dict, alternatives: dict, reference: nn.Module, samples: list, *,
                desc: str = "sensitivity") -> dict:
    """Layer -> {name: output_loss of `qmodel` with that layer alone replaced, minus `qmodel`'s own}, both against
    `reference`'s output (the float model's). `alternatives`: layer -> {name: a module computing the layer another
    way (the same layer of a model calibrated in another format), or "float" (its float weights, unquantized)}.
    This measures each layer in the context of the other layers quantized as in `qmodel`, where their errors
    compound with its own; negative where the alternative is better."""
    layers = quant_layers(qmodel)
    with torch.no_grad():
        references = [_first_tensor(reference(*_as_tuple(batch))) for batch in samples]
    own = _mean_loss(references, _outputs(qmodel, samples))
    losses = {}
    for name, options in tqdm(alternatives.items(), desc=desc, unit="layer", leave=False,
                              disable=len(alternatives) < 8):
        losses[name] = {}
        for option, module in options.items():
            if module == "float":
                with floating(qmodel, floats, [name]):
                    losses[name][option] = _mean_loss(references, _outputs(qmodel, samples)) - own
                continue
            with Overrides({layers[name]: lambda x, module=module: module(x)}):  # a module would become a child
                losses[name][option] = _mean_loss(references, _outputs(qmodel, samples)) - own
    return losses
