"""The simulation's tensor flow: one forward of the simulation model runs under a mode that hands quantized values
to every consumer and tracks integer accumulators.

Quantization is per tensor, as in the deployed graph: one ActQuantizer per quantized tensor, shared by every
layer that reads it. While the simulation runs, a QuantizedValues mode hands the quantized value of a tensor to
*every* consumer (a residual add as well as the next conv), which is what the deploy model's single
QuantizeLinear/DequantizeLinear pair on that tensor does, so the simulation and the exported models agree.

The mode also follows each quantized layer's output through ReLU/ReLU6/clamp to the quantizer that reads it, so
that quantizer can requantize the layer's integer accumulator in one step, acc * (scale_d * scale_w / scale), as
integer runtimes do (ONNX Runtime's QLinearConv): the deployed integers then equal the simulation's, instead of
differing by one in the rare values that the two float roundings of dequantize-then-quantize put on the other
side of a rounding boundary (differences that grow through a deep network).
"""
import contextlib
import math
import weakref
from dataclasses import dataclass, replace

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from .capture import clip_bounds
from .primitives import channel_view, fake_quant, qrange, range_implies_clip, round_ste


@dataclass(frozen=True)
class Accumulator:
    """A quantized layer's output as its integer accumulator: output = clamp(acc * grid, low, high), with `grid`
    (scale_d * scale_w, per channel along `axis`) and the clipping of the activations it has passed through."""
    acc: torch.Tensor
    grid: torch.Tensor
    axis: int
    low: float = -math.inf
    high: float = math.inf


class QuantizedValues(TorchFunctionMode):
    """During one forward of the simulation: replaces each quantized tensor by its quantized value in every op,
    and tracks which tensors are a quantized layer's (clipped) accumulator."""

    def __init__(self):
        super().__init__()
        self.values = {}  # id(float tensor) -> (weakref to it, quantized tensor)
        self.accumulators = {}  # id(float tensor) -> (weakref to it, Accumulator)

    @staticmethod
    def _remember(table: dict, x: torch.Tensor, value) -> None:
        """table[id(x)] = value for as long as x lives: the entry (and the tensors it holds) goes when x does,
        so one forward keeps no more quantized copies and accumulators alive than float tensors."""
        key = id(x)

        def forget(ref):
            if table.get(key, (None,))[0] is ref:
                del table[key]

        table[key] = (weakref.ref(x, forget), value)

    @staticmethod
    def _recall(table: dict, x: torch.Tensor):
        entry = table.get(id(x))
        return entry[1] if entry is not None and entry[0]() is x else None

    def put(self, x: torch.Tensor, xq: torch.Tensor) -> None:
        self._remember(self.values, x, xq)

    def get(self, x: torch.Tensor):
        return self._recall(self.values, x)

    def _swap(self, t):
        if isinstance(t, torch.Tensor):
            quantized = self.get(t)
            if quantized is not None:
                return quantized
        return t

    def put_accumulator(self, y: torch.Tensor, source: Accumulator) -> None:
        self._remember(self.accumulators, y, source)

    def accumulator(self, x: torch.Tensor) -> Accumulator | None:
        return self._recall(self.accumulators, x)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*tree_map(self._swap, args), **tree_map(self._swap, kwargs))
        source = self.accumulator(args[0]) if self.accumulators and args and isinstance(args[0], torch.Tensor) \
            else None
        if source is not None:
            bounds = clip_bounds(func, args, kwargs)
            if bounds is not None and isinstance(out, torch.Tensor):
                self.put_accumulator(out, replace(source, low=max(source.low, bounds[0]),
                                                  high=min(source.high, bounds[1])))
            elif out is args[0]:  # changed in place (or returned as is): no longer known to be the accumulator
                del self.accumulators[id(args[0])]
        return out


_ACTIVE: list[QuantizedValues | None] = []  # one entry per running forward of a simulation model


def active_mode() -> QuantizedValues | None:
    """The QuantizedValues mode of the innermost running simulation forward (None: none, or only observing)."""
    return _ACTIVE[-1] if _ACTIVE else None


DATA_PARALLEL_UNSUPPORTED = ("torch.nn.DataParallel is not supported: its replicas run in threads that do not share "
                             "the quantized values. Use DistributedDataParallel (one process per device), or the "
                             "bare model")


class SharedQuantizer:
    """Marks an activation quantizer; `passes_through` while it hands its input on unchanged (observing)."""

    passes_through = False
    _observed = None  # the forward, or outside one the tensor (weakref), last observed

    def first_sight(self, x: torch.Tensor) -> bool:
        """Whether `x` is a batch this quantizer has not observed: the first tensor it is handed in a forward of
        the model (a max pool's output, which shares its input's quantizer, comes second), or outside one, another
        tensor than the last."""
        forward = _FORWARD[0] if _ACTIVE else None
        if forward is not None:
            new = forward != self._observed
            self._observed = forward
        else:
            new = not (isinstance(self._observed, weakref.ref) and self._observed() is x)
            self._observed = weakref.ref(x)
        return new


_LAYER_BY_LAYER = []  # while not empty, root forwards run without the mode (layer_by_layer)
_FORWARD = [0]  # root forwards started so far


@contextlib.contextmanager
def layer_by_layer():
    """Forwards of a simulation model run inside run without the QuantizedValues mode: each quantized layer
    quantizes its own input and hands on its output, and no other op sees quantized values. For measuring one
    quantized layer among float ones (core/sensitivity.py), where the mode's cost on every op buys nothing."""
    _LAYER_BY_LAYER.append(True)
    try:
        yield
    finally:
        _LAYER_BY_LAYER.pop()


def enter_simulation(module, args):
    """Forward pre-hook of the root model: quantized values flow to every consumer during this forward. Skipped
    (None on the stack) while every quantizer only observes, where the mode's cost per op would buy nothing, and
    inside layer_by_layer."""
    if getattr(module, "_is_replica", False):
        raise TypeError(DATA_PARALLEL_UNSUPPORTED)
    _FORWARD[0] += 1
    if _LAYER_BY_LAYER or all(m.passes_through for m in module.modules() if isinstance(m, SharedQuantizer)):
        _ACTIVE.append(None)
        return
    mode = QuantizedValues()
    mode.__enter__()
    _ACTIVE.append(mode)


def exit_simulation(module, args, output):
    if _ACTIVE:
        mode = _ACTIVE.pop()
        if mode is not None:
            mode.__exit__(None, None, None)


@contextlib.contextmanager
def simulating():
    """Quantized values flow to every consumer of a tensor for code run inside, as in a forward of the whole
    simulation model (block reconstruction runs one block at a time)."""
    mode = QuantizedValues()
    _ACTIVE.append(mode)
    try:
        with mode:
            yield
    finally:
        _ACTIVE.pop()


def shared_quantized(x: torch.Tensor, quantize_fn) -> torch.Tensor:
    """`quantize_fn(x)`, computed once per tensor and forward, and handed to every consumer of `x`."""
    mode = active_mode()
    cached = mode.get(x) if mode is not None else None
    if cached is not None:
        return cached
    xq = quantize_fn(x)
    if mode is not None:
        mode.put(x, xq)
    return xq


def requantize(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, num_bits: int) -> torch.Tensor:
    """fake_quant(x): from x's accumulator in one rounding where x is a quantized layer's output clipped by nothing
    that this range does not imply (so that a runtime drops the clip and requantizes as here)."""
    mode = active_mode()
    source = mode.accumulator(x) if mode is not None else None
    if source is None or not range_implies_clip(scale, offset, num_bits, source.low, source.high):
        return fake_quant(x, scale, offset, num_bits)
    qmin, qmax = qrange(num_bits)
    multiplier = (source.grid / scale).to(source.acc)
    if multiplier.numel() > 1:
        multiplier = channel_view(multiplier, source.acc.dim(), source.axis)
    codes = torch.clamp(round_ste(source.acc * multiplier) + offset, qmin, qmax)
    return (codes - offset) * scale
