"""Block reconstruction (BRECQ, Li et al. 2021, with QDrop, Wei et al. 2022; an openamct extension): after
calibration and the layers' weight algorithms, each block's output is matched to the float model's, jointly over
its layers' roundings and the step sizes of the activations it quantizes, one block at a time in network order.

A block is a module of the model called once per forward with one tensor, returning one (a residual block, an
MBConv block). By default (`find_blocks`) the largest such modules with at most MAX_BLOCK_LAYERS quantized layers,
and each quantized layer outside them on its own. The model is not traced: a block is called as the module it is,
on inputs cached for it, so any model the toolkit captures can be reconstructed.

For each block:
- its input is cached over the calibration batches (which the calibration model records when reconstruction is
  configured) twice: from the float model (every quantized layer on its float weights, no quantizers) and from the
  quantized model, whose earlier blocks are already reconstructed. The float block's output is the target;
- each weight gets AdaRound's soft rounding h(V) between the two levels around its float value (grid levels, or
  the NUQ codebook's), started near the rounding the layer's weight algorithm chose (GPTQ's by default): from the
  paper's start, the fractional part, 300 steps left the first blocks worse than GPTQ had. Each activation
  quantizer of the block learns its step size (LSQ's straight-through gradient);
- a block that only looks at nearby pixels learns on windows of its maps (block_learning.Windows);
- each Adam step runs the block on `batch_size` cached samples. QDrop: each element of the block's input is the
  float or the quantized cached value, and each element of an activation the quantized or the unquantized value,
  drawn with `drop_prob`, so the roundings learned do not fit one pattern of activation error;
- the loss is the output's mean squared error in units of its value before reconstruction, plus AdaRound's
  regulariser (reg_param, beta annealed over beta_range after the warm_start share of the steps). Once every
  rounding has settled at 0 or 1 the remaining steps are skipped.
The block does not learn on HELD_ASIDE of the calibration samples: the state kept is the one with the lowest
output error on them, measured every CHECK_EVERY steps (block_learning.reconstruct_block), the block as calibration
made it included (the log says so). Its roundings are made hard (the weights stay on their layers' grids, so the
exported models are built as before) and its learned step sizes kept.
"""
import contextlib

import torch
from torch import nn
from torch.func import functional_call
from tqdm import tqdm

from . import log
from .block_learning import WINDOW, Overrides, Windows, reconstruct_block
from .config import ConfigError
from .layer import QuantLayer
from .simulation import simulating

MAX_BLOCK_LAYERS = 4  # the automatic rule's largest block: a bottleneck with its downsample, an MBConv block
CHUNK = 32  # samples per forward when caching inputs and targets


class _Stop(Exception):
    """Raised once a block's input is cached: the rest of the forward is not needed."""


class Recorder:
    """A forward pre-hook of the calibration model `model` (registered here, removed by `handle`): the model inputs
    of the first `batch_num` calibration batches, for block reconstruction after calibration."""

    def __init__(self, params, batch_num: int, model: nn.Module):
        self.params, self.batch_num, self.inputs = params, batch_num, []
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        if len(self.inputs) < self.batch_num:
            detach = lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v
            self.inputs.append((tuple(detach(a) for a in args), {k: detach(v) for k, v in kwargs.items()}))


def float_parameters(layers: dict) -> dict:
    """Each quantized layer's float weight and bias (before the weight algorithms change them): the float model."""
    return {name: (layer.layer.weight.detach().clone(),
                   None if layer.layer.bias is None else layer.layer.bias.detach().clone())
            for name, layer in layers.items()}

def float_model(layers: dict, floats: dict) -> Overrides:
    """Within a `with`: the quantized `layers` (name -> QuantLayer) on their float weight and bias (`floats`:
    float_parameters, taken before `convert` put the chosen weights in), no quantizer."""
    def forward(layer, weight, bias):
        return lambda x: functional_call(layer.layer, {"weight": weight, "bias": bias}, (x,))
    return Overrides({layer: forward(layer, *floats[name]) for name, layer in layers.items()})


def _run(qmodel: nn.Module, inputs: list) -> None:
    with torch.no_grad():
        for args, kwargs in inputs:
            with contextlib.suppress(_Stop):
                qmodel(*args, **kwargs)


def find_blocks(qmodel: nn.Module, layers: dict, floats: dict, inputs: list, names=()) -> tuple[list, set]:
    """([(block name, [its quantized layer names])] in the order the forward reaches them, the names of the blocks
    whose input is the output of the block before): the modules `names`, or the automatic rule's (see the module
    docstring)."""
    calls, order, tensors = {}, [], {}  # tensors: name -> (its input, its output), held to compare identities

    def watch(name):
        def before(module, args, kwargs):
            plain = len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor)
            count, single = calls.get(name, (0, True))
            calls[name] = (count + 1, single and plain)
            if count == 0:
                order.append(name)

        def after(module, args, kwargs, output):
            calls[name] = (calls[name][0], calls[name][1] and isinstance(output, torch.Tensor))
            tensors[name] = (args[0] if args else None, output)
        return before, after

    handles = []
    for name, module in qmodel.named_modules():
        if name:
            before, after = watch(name)
            handles += [module.register_forward_pre_hook(before, with_kwargs=True),
                        module.register_forward_hook(after, with_kwargs=True)]
    try:
        with float_model(layers, floats):
            _run(qmodel, inputs[:1])
    finally:
        for handle in handles:
            handle.remove()

    def members(name):
        return [layer for layer in layers if layer == name or layer.startswith(name + ".")]

    def usable(name):
        return calls.get(name, (0, False)) == (1, True)

    if names:
        modules = dict(qmodel.named_modules())
        for name in names:
            if name not in modules:
                raise ConfigError(f"field 'block_reconstruction.blocks': '{name}' is not a module of the model")
            if not members(name):
                raise ConfigError(f"field 'block_reconstruction.blocks': '{name}' holds no quantized layer")
            if not usable(name):
                raise ConfigError(f"field 'block_reconstruction.blocks': '{name}' is not called once per forward "
                                  f"with one tensor returning one, so it cannot be run on its own")
        taken = [layer for name in names for layer in members(name)]
        if len(taken) != len(set(taken)):
            raise ConfigError("field 'block_reconstruction.blocks': the blocks overlap (a layer is in two of them)")
        chosen = list(names)
    else:
        chosen = []

        def descend(prefix, module):
            for child_name, child in module.named_children():
                name = prefix + child_name
                inside = members(name)
                if not inside:
                    continue
                if usable(name) and (len(inside) <= MAX_BLOCK_LAYERS or isinstance(child, QuantLayer)):
                    chosen.append(name)
                elif not isinstance(child, QuantLayer):
                    descend(name + ".", child)
        descend("", qmodel)
    chosen.sort(key=order.index)
    chained = {after for before, after in zip(chosen, chosen[1:]) if tensors[after][0] is tensors[before][1]}
    return [(name, members(name)) for name in chosen], chained


def _block_input(qmodel: nn.Module, block: nn.Module, inputs: list) -> torch.Tensor:
    """The block's input over the recorded batches, the forward stopped there."""
    captured = []

    def hook(module, args):
        captured.append(args[0].detach())
        raise _Stop

    handle = block.register_forward_pre_hook(hook)
    try:
        _run(qmodel, inputs)
    finally:
        handle.remove()
    return torch.cat(captured)

def reconstruct(qmodel: nn.Module, layers: dict, floats: dict, recorder: Recorder) -> None:
    """Every block of `qmodel` (calibrated) reconstructed in network order on the recorded calibration inputs.

    A block's inputs are cached by running the model up to it, except where its input is the output of the block
    before: then they are that block's float target and its output once reconstructed."""
    params, inputs = recorder.params, recorder.inputs
    blocks, chained = find_blocks(qmodel, layers, floats, inputs, params.blocks)
    previous = None  # (block, its quantized input, its float target)
    with tqdm(blocks, desc="block reconstruction", unit="block", leave=False, disable=None) as bar:
        for name, member_names in bar:
            block = qmodel.get_submodule(name)
            members = {layer: layers[layer] for layer in member_names}
            if name in chained:
                before_block, before_input, x_float = previous
                with torch.no_grad(), simulating():
                    x_quant = torch.cat([before_block(chunk) for chunk in before_input.split(CHUNK)])
            else:
                with float_model(layers, floats):
                    x_float = _block_input(qmodel, block, inputs)
                x_quant = _block_input(qmodel, block, inputs)
            previous = None
            with float_model(layers, floats), torch.no_grad():
                target = torch.cat([block(chunk) for chunk in x_float.split(CHUNK)])
                windows = Windows(block, x_float, target)
            before, after = reconstruct_block(block, members, floats, x_float, x_quant, target, windows, params,
                                              name)
            log.info(f"Reconstruct block '{name}' ({', '.join(member_names)}): output error {before:.4g} -> "
                     f"{after:.4g}" + ("" if windows.side is None else f", learned on {WINDOW}x{WINDOW} windows")
                     + ".", "Reconstruction")
            bar.set_postfix(block=name, error=f"{after / max(before, 1e-30):.3f}x")
            previous = (block, x_quant, target)
            del x_float
