"""The quantized layer of a calibration/simulation model: a float layer plus named quantizer submodules.

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
import math
import weakref
from dataclasses import dataclass, replace

import numpy as np

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from .config import LayerConfig
from .graph import clip_bounds
from .observers import OBSERVERS
from . import nuq
from .primitives import (act_qparams, channel_view, fake_quant, fake_quant_weight, qrange, quantize, quantize_bias,
                         range_implies_clip, round_ste, weight_scales)


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

    def put(self, x: torch.Tensor, xq: torch.Tensor) -> None:
        self.values[id(x)] = (weakref.ref(x), xq)

    def get(self, x: torch.Tensor):
        entry = self.values.get(id(x))
        return entry[1] if entry is not None and entry[0]() is x else None

    def _swap(self, t):
        if isinstance(t, torch.Tensor):
            quantized = self.get(t)
            if quantized is not None:
                return quantized
        return t

    def put_accumulator(self, y: torch.Tensor, source: Accumulator) -> None:
        self.accumulators[id(y)] = (weakref.ref(y), source)

    def accumulator(self, x: torch.Tensor) -> Accumulator | None:
        entry = self.accumulators.get(id(x))
        return entry[1] if entry is not None and entry[0]() is x else None

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


_ACTIVE: list[QuantizedValues] = []


DATA_PARALLEL_UNSUPPORTED = ("torch.nn.DataParallel is not supported: its replicas run in threads that do not share "
                             "the quantized values. Use DistributedDataParallel (one process per device), or the "
                             "bare model")


def enter_simulation(module, args):
    """Forward pre-hook of the root model: quantized values flow to every consumer during this forward."""
    if getattr(module, "_is_replica", False):
        raise TypeError(DATA_PARALLEL_UNSUPPORTED)
    mode = QuantizedValues()
    mode.__enter__()
    _ACTIVE.append(mode)


def exit_simulation(module, args, output):
    if _ACTIVE:
        _ACTIVE.pop().__exit__(None, None, None)


def shared_quantized(x: torch.Tensor, quantize_fn) -> torch.Tensor:
    """`quantize_fn(x)`, computed once per tensor and forward, and handed to every consumer of `x`."""
    mode = _ACTIVE[-1] if _ACTIVE else None
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
    source = _ACTIVE[-1].accumulator(x) if _ACTIVE else None
    if source is None or not range_implies_clip(scale, offset, num_bits, source.low, source.high):
        return fake_quant(x, scale, offset, num_bits)
    qmin, qmax = qrange(num_bits)
    multiplier = (source.grid / scale).to(source.acc)
    if multiplier.numel() > 1:
        multiplier = channel_view(multiplier, source.acc.dim(), source.axis)
    codes = torch.clamp(round_ste(source.acc * multiplier) + offset, qmin, qmax)
    return (codes - offset) * scale


class ActQuantizer(nn.Module):
    """Observes a tensor while calibrating, then fake-quantizes it with the computed scale/offset."""

    def __init__(self, params, asymmetric: bool, batch_num: int, bounds, layer: str):
        super().__init__()
        self.params, self.asymmetric, self.batch_num, self.layer = params, asymmetric, batch_num, layer
        self.bounds = tuple(bounds) if bounds else (-math.inf, math.inf)
        self.observer = OBSERVERS[params.act_algo](params, asymmetric, batch_num, layer)
        self.batches_seen = 0
        self._last_seen = None
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("offset", torch.tensor(0.0))
        self.calibrated = False

    def forward(self, x):
        if self.calibrated:
            return shared_quantized(x, lambda v: requantize(v, self.scale, self.offset, self.params.num_bits))
        seen = self._last_seen() if self._last_seen is not None else None
        if seen is not x and self.batches_seen < self.batch_num:  # AMCT ignores batches beyond batch_num
            self.observer.observe(x)
            self.batches_seen += 1
            self._last_seen = weakref.ref(x)
        return x

    def finish(self) -> None:
        if self.calibrated:
            return
        if self.batches_seen == 0:
            raise RuntimeError(f"layer '{self.layer}' saw no calibration batch: is it reached by the forward pass?")
        clip_min, clip_max = self.observer.compute(self.bounds)
        scale, offset = act_qparams(clip_min, clip_max, self.params.num_bits, self.asymmetric)
        self.scale.fill_(scale)
        self.offset.fill_(offset)
        self.observer = None  # frees the statistics
        self.calibrated = True

    def extra_repr(self):
        state = f"scale={self.scale.item():.6g}, offset={int(self.offset)}" if self.calibrated else "observing"
        return f"{self.params.act_algo}, bits={self.params.num_bits}, asymmetric={self.asymmetric}, {state}"


class WeightQuantizer(nn.Module):
    """ARQ: symmetric per-channel (or per-tensor) scales from the weight's own range; with NUQ the INT8 codes are
    then snapped to the layer's codebook (fitted after calibration, see nuq.py)."""

    def __init__(self, params, axis: int):
        super().__init__()
        self.params, self.axis = params, axis
        self.levels = None  # NUQ codebook(s), int array [num_steps] or [out_channels, num_steps]
        self._table = None
        self.fixed_scales = None  # set once GPTQ has chosen the weights: their scales must not move with them

    def scales(self, weight: torch.Tensor) -> torch.Tensor:
        if self.fixed_scales is not None:
            return self.fixed_scales.to(weight.device)
        return weight_scales(weight, self.params.num_bits, self.params.channel_wise, self.axis)

    def codes(self, weight: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
        """INT8 codes as float (on `scales`, by default the quantizer's), NUQ-snapped once a codebook is fitted."""
        scales = self.scales(weight) if scales is None else scales
        scale = channel_view(scales.to(weight.device), weight.dim(), self.axis)
        codes = quantize(weight.detach(), scale, 0, self.params.num_bits)
        if self._table is None:
            return codes
        table = self._table.to(weight.device)
        rows = codes.reshape(table.shape[0], -1).long() + 128 if table.shape[0] > 1 else codes.reshape(1, -1).long() + 128
        return torch.gather(table, 1, rows).reshape(codes.shape).to(codes.dtype)

    def forward(self, weight):
        if self._table is None:
            return fake_quant_weight(weight, self.scales(weight).to(weight.device), self.params.num_bits, self.axis)
        scale = channel_view(self.scales(weight).to(weight.device), weight.dim(), self.axis)
        return weight + (self.codes(weight) * scale - weight).detach()

    def fit_codebook(self, weight: torch.Tensor, importance: torch.Tensor) -> None:
        """Choose the NUQ levels minimising sum(importance * (weight - dequantized level)^2) over `weight`'s INT8
        codes (before any snapping); `importance` (the weight's shape) is each weight's share of the output error."""
        scale = channel_view(self.scales(weight).to(weight.device), weight.dim(), self.axis)
        codes = quantize(weight.detach(), scale, 0, self.params.num_bits)
        importance = torch.broadcast_to(importance, weight.shape) * scale ** 2
        per_channel = nuq.per_channel_codebooks(self.params.codebook, weight.shape, self.params.num_steps)
        self.levels = nuq.codebooks(codes.cpu().numpy().astype(np.int64), importance.cpu().double().numpy(),
                                    self.params.num_steps, per_channel)
        self._table = torch.from_numpy(nuq.snap_table(self.levels)).float()

    def extra_repr(self):
        algo = f"nuq({self.params.num_steps} steps, per {self.params.codebook})" \
            if self.params.wts_algo == "nuq_quantize" else "arq"
        return f"{algo}, bits={self.params.num_bits}, channel_wise={self.params.channel_wise}"


def _column_quantizer(weight: torch.Tensor, quantizer: WeightQuantizer, device):
    """column (one value per output channel) -> its dequantized value on the quantizer's grid (and codebook)."""
    scale = quantizer.scales(weight).double().to(device).expand(weight.shape[0])
    table = quantizer._table.to(device).double() if quantizer._table is not None else None
    rows = torch.arange(weight.shape[0], device=device) if table is not None and table.shape[0] > 1 else \
        torch.zeros(weight.shape[0], dtype=torch.long, device=device)
    qmin, qmax = qrange(quantizer.params.num_bits)

    def quantize_column(column):
        codes = torch.clamp(torch.round(column / scale), qmin, qmax)
        if table is not None:
            codes = table[rows, codes.long() + 128]
        return codes * scale
    return quantize_column


def _damped(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """hessian (float64, [..., K, K]) with damp * mean diagonal added, and 1 on the diagonal of inputs that were
    always 0: their weights are then rounded to nearest and kept (not zeroed: other data may reach them)."""
    h = hessian.double().clone()
    diagonal = torch.diagonal(h, dim1=-2, dim2=-1)
    diagonal[diagonal == 0] = 1.0
    diagonal += damp * diagonal.mean(-1, keepdim=True)
    return h


def _ridged(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """hessian (float64, [K, K]) with damp * mean diagonal added to its diagonal: the output-error metric that NUQ's
    level refits and the choice between their rounds share."""
    h = hessian.double()
    return h + damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)


def _extremes(w: torch.Tensor, channel_wise: bool) -> torch.Tensor:
    """Mask of the weights that set the ARQ scale (largest magnitude per row, or in the tensor). GPTQ leaves them
    as they are, so the scale recomputed from its weights is the one it used: QAT's arq_retrain, which recomputes
    the range at every step, then starts from exactly the PTQ model."""
    magnitude = w.abs()
    return magnitude == (magnitude.amax(1, keepdim=True) if channel_wise else magnitude.max())


def gptq(weight: torch.Tensor, hessian: torch.Tensor, quantizer: WeightQuantizer, block: int = 128,
         damp: float = 0.01) -> torch.Tensor:
    """Weights on the quantizer's grid chosen column by column, each column's error pushed onto the columns not
    yet quantized through the inverse Hessian E[x x^T] (Frantar et al. 2023, GPTQ): the layer's output error on
    the calibration data, not the weight error, is what is minimised. Returns dequantized weights."""
    shape = weight.shape
    w = weight.detach().double().reshape(shape[0], -1).clone()
    h = _damped(hessian.to(w.device), damp)
    order = torch.argsort(torch.diag(h), descending=True)  # the columns that matter most go first
    w, h = w[:, order], h[order][:, order]
    kept, original = _extremes(w, quantizer.params.channel_wise), w.clone()
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    quantize_column = _column_quantizer(weight, quantizer, w.device)
    out = torch.zeros_like(w)
    for start in range(0, w.shape[1], block):
        end = min(start + block, w.shape[1])
        w1, errors = w[:, start:end].clone(), torch.zeros(w.shape[0], end - start, dtype=w.dtype, device=w.device)
        for k in range(end - start):
            q = quantize_column(w1[:, k])
            out[:, start + k] = q
            error = (w1[:, k] - q) / upper[start + k, start + k]
            w1[:, k:] -= error[:, None] * upper[start + k, start:end][None, k:]
            w1 = torch.where(kept[:, start:end], original[:, start:end], w1)
            errors[:, k] = error
        w[:, end:] -= errors @ upper[start:end, end:]
        w = torch.where(kept, original, w)
    return out[:, torch.argsort(order)].reshape(shape).to(weight.dtype)


def gptq_depthwise(weight: torch.Tensor, hessians: torch.Tensor, quantizer: WeightQuantizer,
                   damp: float = 0.01) -> torch.Tensor:
    """GPTQ for a depthwise conv: each output channel is a layer of its own, its kh * kw weights seeing only its
    input channel's patches, so every channel has its own Hessian ([C, K, K]) and all channels run as a batch."""
    shape = weight.shape
    w = weight.detach().double().reshape(shape[0], -1).clone()
    h = _damped(hessians.to(w.device), damp)
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    quantize_column = _column_quantizer(weight, quantizer, w.device)
    kept, original = _extremes(w, quantizer.params.channel_wise), w.clone()
    out = torch.zeros_like(w)
    for k in range(w.shape[1]):
        out[:, k] = quantize_column(w[:, k])
        error = (w[:, k] - out[:, k]) / upper[:, k, k]
        w[:, k:] -= error[:, None] * upper[:, k, k:]
        w = torch.where(kept, original, w)
    return out.reshape(shape).to(weight.dtype)


def refit_levels(weight: torch.Tensor, chosen: torch.Tensor, hessian: torch.Tensor, quantizer: WeightQuantizer,
                 damp: float = 0.01) -> torch.Tensor:
    """The NUQ levels given which level each weight of `chosen` (GPTQ's weights) takes: the least-squares levels of
    the output error tr((W - Q) H (W - Q)^T), rounded to the INT8 grid (as GPTVQ updates its codebook, van Baalen
    et al. 2024). Sets the quantizer's levels and returns the weights on them."""
    shape, num_steps = weight.shape, quantizer.params.num_steps
    w = weight.detach().double().reshape(shape[0], -1)
    device = w.device
    h = _ridged(hessian.to(device), damp)
    scale = quantizer.scales(weight).double().to(device).reshape(-1, 1).expand_as(w)
    books = torch.from_numpy(np.atleast_2d(quantizer.levels)).double().to(device)  # [1 or out_channels, steps]
    codes = torch.round(chosen.detach().double().reshape(w.shape) / scale)
    index = torch.argmin((codes[:, :, None] - books[:, None, :]).abs(), dim=2)  # [out, cols]
    # normal equations a c = b over a few output channels at a time, in float32 (the levels are rounded anyway)
    a = torch.zeros(books.shape[0], num_steps, num_steps, dtype=torch.float64, device=device)
    b = torch.zeros(books.shape[0], num_steps, dtype=torch.float64, device=device)
    h32, step = h.float(), max(1, 2 ** 22 // (num_steps * w.shape[1]))
    for start in range(0, w.shape[0], step):
        rows = slice(start, start + step)
        parts = torch.stack([scale[rows] * (index[rows] == level) for level in range(num_steps)]).float()
        parts_h = parts @ h32  # [num_steps, rows, cols]
        if books.shape[0] == 1:
            a[0] += torch.einsum("loj,moj->lm", parts_h, parts).double()
            b[0] += torch.einsum("loj,oj->l", parts_h, w[rows].float()).double()
        else:
            a[rows] = torch.einsum("loj,moj->olm", parts_h, parts).double()
            b[rows] = torch.einsum("loj,oj->ol", parts_h, w[rows].float()).double()
    eye = torch.eye(num_steps, dtype=torch.float64, device=device)
    ridge = 1e-9 * a.diagonal(dim1=1, dim2=2).mean(1).clamp(min=1e-30)[:, None, None] * eye
    levels = torch.linalg.solve(a + ridge, (b + ridge[:, 0, 0, None] * books)[..., None])[..., 0]
    levels = torch.clamp(torch.round(levels), *qrange(quantizer.params.num_bits))
    rows = torch.arange(w.shape[0], device=device)[:, None] if books.shape[0] > 1 else \
        torch.zeros(w.shape[0], 1, dtype=torch.long, device=device)
    new = levels[rows, index] * scale
    levels = np.sort(levels.to(torch.int32).cpu().numpy(), axis=1)
    quantizer.levels = levels if books.shape[0] > 1 else levels[0]
    quantizer._table = torch.from_numpy(nuq.snap_table(quantizer.levels)).float()
    return new.reshape(shape).to(weight.dtype)


def refit_scales(weight: torch.Tensor, chosen: torch.Tensor, hessian: torch.Tensor, quantizer: WeightQuantizer,
                 limit: float = 0.1) -> torch.Tensor:
    """GPTQ's codes kept, each output channel's scale set to the one that minimises the layer's output error for
    them, s * <q, w>_H / <q, q>_H with q = `chosen` (within `limit` of s): GPTQ chose the codes for the scale the
    weights' range set, which is not the best scale for the codes it chose. Updates the quantizer's fixed scales
    and returns the weights on them. The code that set each scale stays the largest, so ARQ's scale recomputed from
    the weights is the new one. `hessian` is [K, K], or [C, K, K] for a depthwise conv."""
    w = weight.detach().double().reshape(weight.shape[0], -1)
    q = chosen.detach().double().reshape(w.shape)
    h = hessian.to(w.device).double()
    qh = q @ h if h.dim() == 2 else torch.einsum("ck,ckj->cj", q, h)
    num, den = (qh * w).sum(1), (qh * q).sum(1)
    if quantizer.fixed_scales.numel() == 1:
        num, den = num.sum(), den.sum()
    ratio = torch.where(den > 0, num / den.clamp(min=torch.finfo(den.dtype).tiny), torch.ones_like(num))
    ratio = ratio.clamp(1 - limit, 1 + limit)
    quantizer.fixed_scales = quantizer.fixed_scales * ratio.to(quantizer.fixed_scales).reshape(
        quantizer.fixed_scales.shape)
    return (q * ratio.reshape(-1, 1)).reshape(weight.shape).to(weight.dtype)


class QuantLayer(nn.Module):
    """`layer` (BN already folded) run on fake-quantized input and weights through its own forward.

    `output_quantizer` is set when the output feeds an elementwise add: quantizing it lets the runtime run both
    the layer and the add on integers.
    """

    collects_statistics = True  # input moments and GPTQ's Hessian for finish_weights (QAT: not needed)

    def __init__(self, layer: nn.Module, config: LayerConfig, input_quantizer: ActQuantizer, name: str, axis: int,
                 output_quantizer: ActQuantizer | None = None):
        super().__init__()
        self.layer, self.name, self.axis = layer, name, axis
        self.input_quantizer = input_quantizer
        self.weight_quantizer = WeightQuantizer(config.weight, axis)
        self.output_quantizer = output_quantizer
        self.input_moments = None  # running sums of each input channel's mean and mean square, and batch count
        self._moment_batches = 0
        self.hessian = None  # GPTQ: running sum of E[x x^T] over the weight's columns

    def __getattr__(self, name):
        """Attributes the wrapped layer has (in_features, stride, ...) read through, so model code that uses them
        keeps working after the swap."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("layer"), name)

    def _patches(self, x: torch.Tensor) -> torch.Tensor:
        """F.unfold of a Conv2d's input as its forward pads it: [N, C * kh * kw, L]."""
        layer = self.layer
        padding = layer.padding
        if getattr(layer, "same_pad", None) is not None:  # models.efficientnet_lite.Conv2dSame pads in forward
            x, padding = F.pad(x, layer.same_pad), 0
        elif padding == "valid":
            padding = 0
        elif padding == "same":  # stride 1 (PyTorch's rule): the extra pixel goes after
            total = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size)]
            x = F.pad(x, [p for t in reversed(total) for p in (t // 2, t - t // 2)])
            padding = 0
        return F.unfold(x, layer.kernel_size, layer.dilation, padding, layer.stride)

    def _is_depthwise(self) -> bool:
        layer = self.layer
        return isinstance(layer, nn.Conv2d) and 1 < layer.groups == layer.in_channels == layer.out_channels

    def _hessian(self, x: torch.Tensor) -> torch.Tensor | None:
        """GPTQ's E[x x^T] over the weight's columns, for Linear and Conv2d with groups 1: [K, K]; for a depthwise
        Conv2d, one [kh * kw, kh * kw] per channel (each channel is a layer of its own): [C, K, K]. Else None."""
        if isinstance(self.layer, nn.Linear):
            rows = x.reshape(-1, x.shape[-1])
        elif isinstance(self.layer, nn.Conv2d) and self.layer.groups == 1:
            layer = self.layer
            if layer.kernel_size == (1, 1) and layer.stride == (1, 1) and getattr(layer, "same_pad", None) is None:
                rows = x.transpose(0, 1).reshape(x.shape[1], -1).t()
            else:
                patches = self._patches(x)
                rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        elif self._is_depthwise():
            channels, taps = x.shape[1], self.layer.kernel_size[0] * self.layer.kernel_size[1]
            hessian, count = 0.0, 0
            for part in x.split(max(1, 2 ** 24 // (x[0].numel() * taps))):  # bounded memory for the patches
                patches = self._patches(part).reshape(part.shape[0], channels, taps, -1)
                hessian = hessian + torch.einsum("ncil,ncjl->cij", patches, patches)
                count += part.shape[0] * patches.shape[-1]
            return hessian / count
        else:
            return None
        return rows.t() @ rows / rows.shape[0]

    def _observe_input(self, x: torch.Tensor) -> None:
        channel_dim = -1 if isinstance(self.layer, nn.Linear) else 1
        dims = [d for d in range(x.dim()) if d != channel_dim % x.dim()]
        x = x.detach().float()
        moments = torch.stack([x.mean(dims), x.pow(2).mean(dims)])
        self.input_moments = moments if self.input_moments is None else self.input_moments + moments
        self._moment_batches += 1
        if self.weight_quantizer.params.rounding == "gptq":
            hessian = self._hessian(x)
            if hessian is not None:
                self.hessian = hessian if self.hessian is None else self.hessian + hessian

    def _per_weight(self, channel_values: torch.Tensor) -> torch.Tensor:
        """Expand per-input-channel values to the weight's [out, in per group] layout."""
        weight = self.layer.weight
        groups = getattr(self.layer, "groups", 1)
        per_group = channel_values.reshape(groups, -1)
        return per_group.repeat_interleave(weight.shape[0] // groups, dim=0)

    def finish_weights(self) -> None:
        """After calibration: fit the NUQ codebook; choose the weights by GPTQ where configured, with NUQ then
        alternating `num_of_iteration` times between refitting the levels to GPTQ's choice and GPTQ on the new
        levels (keeping whichever weights give the least output error); below 8 bits, refit each channel's scale to
        GPTQ's codes (refit_scales: at 8 bits, uniform or NUQ, it did not help on EfficientNet-Lite0); then correct
        the bias for the shift of the output mean that weight quantization leaves, (W_q - W) . E[x] per output
        channel (Nagel et al. 2019), so that it does not compound through the network."""
        if self.input_moments is None:
            return
        mean, power = (self.input_moments / self._moment_batches).to(self.layer.weight.device)
        self.input_moments = None
        quantizer, weight = self.weight_quantizer, self.layer.weight
        original = weight.detach().clone()
        nuq_fit = quantizer.params.wts_algo == "nuq_quantize" and quantizer.levels is None
        coarse = quantizer.params.num_bits < 8
        if nuq_fit:
            per_weight = self._per_weight(power)
            quantizer.fit_codebook(weight, per_weight.reshape(per_weight.shape + (1,) * (weight.dim() - 2)))
        if self.hessian is not None and self.hessian.dim() == 3:
            quantizer.fixed_scales = quantizer.scales(weight)
            hessians = self.hessian / self._moment_batches
            chosen = gptq_depthwise(weight, hessians, quantizer)
            if coarse:
                chosen = refit_scales(weight, chosen, hessians, quantizer)
            with torch.no_grad():
                weight.copy_(chosen)
            self.hessian = None
        if self.hessian is not None:
            hessian = self.hessian / self._moment_batches
            quantizer.fixed_scales = quantizer.scales(weight)
            rounds = quantizer.params.num_of_iteration if nuq_fit else 0
            damped = _ridged(hessian, 0.01)
            best = None

            def keep(chosen):
                nonlocal best
                delta = (chosen - weight).detach().double().reshape(weight.shape[0], -1)
                error = float(torch.einsum("oi,ij,oj->", delta, damped, delta))  # the layer's output error
                if best is None or error < best[0]:
                    best = (error, chosen, quantizer.levels, quantizer._table, quantizer.fixed_scales)

            for round_ in range(rounds + 1):
                chosen = gptq(weight, hessian, quantizer)
                if coarse:
                    chosen = refit_scales(weight, chosen, damped, quantizer)
                keep(chosen)
                if round_ < rounds:  # the levels that best fit these weights, then GPTQ again on them
                    keep(refit_levels(weight, chosen, hessian, quantizer))
            _, chosen, quantizer.levels, quantizer._table, quantizer.fixed_scales = best
            with torch.no_grad():
                weight.copy_(chosen)
            self.hessian = None
        if not quantizer.params.bias_correction or self.axis != 0:
            return
        with torch.no_grad():
            error = (quantizer(weight) - original).reshape(weight.shape[0], weight.shape[1], -1).sum(2)
            shift = (error * self._per_weight(mean)).sum(1)
            if self.layer.bias is None:
                self.layer.bias = nn.Parameter(torch.zeros_like(shift))
            self.layer.bias -= shift

    def forward(self, x):
        if not self.input_quantizer.calibrated:
            if self.collects_statistics:
                self._observe_input(x)
            x = self.input_quantizer(x)
            y = functional_call(self.layer, {"weight": self.weight_quantizer(self.layer.weight)}, (x,))
        else:
            y = self._integer_forward(self.input_quantizer(x))
        return self.output_quantizer(y) if self.output_quantizer is not None else y

    def _integer_forward(self, xq: torch.Tensor) -> torch.Tensor:
        """The layer on integer codes, then one division by 1 / (scale_d * scale_w), the accumulator scale.

        This is the deployed arithmetic: the conv of small integers is exact in float32, so the fake-quant ONNX
        model (which does the same) agrees with this simulation bit for bit, and the bias is added as the INT32
        codes QLinearConv adds. Gradients pass straight through the roundings.
        """
        scale = self.input_quantizer.scale
        codes = xq / scale
        codes = codes + (torch.round(codes) - codes).detach()
        scale_w = self.weight_scales().to(xq.device)
        weight = self.layer.weight
        weight_codes = weight / channel_view(scale_w, weight.dim(), self.axis)
        weight_codes = weight_codes + (self.weight_quantizer.codes(weight, scale_w) - weight_codes).detach()
        grid = scale * scale_w
        bias = self.layer.bias
        if bias is not None:
            bias = bias / grid
            bias = bias + (quantize_bias(self.layer.bias, grid) - bias).detach()
        acc = functional_call(self.layer, {"weight": weight_codes, "bias": bias}, (codes,))
        channel_axis = acc.dim() - 1 if isinstance(self.layer, nn.Linear) else 1
        inverse = 1.0 / grid  # divided by, as the fake-quant ONNX model does (see export.build_quantized)
        y = acc / (channel_view(inverse, acc.dim(), channel_axis) if inverse.numel() > 1 else inverse)
        if _ACTIVE:
            _ACTIVE[-1].put_accumulator(y, Accumulator(acc, grid, channel_axis))
        return y

    def weight_scales(self) -> torch.Tensor:
        """scale_w as deployed: the quantizer's, raised where the INT32 bias on the grid scale_d * scale_w would
        overflow (channels whose weights BN folding made all but zero, whose codes are 0 either way)."""
        scale_w = self.weight_quantizer.scales(self.layer.weight).detach()
        if self.layer.bias is None:
            return scale_w
        floor = self.layer.bias.detach().abs().to(scale_w) / (float(self.input_quantizer.scale) * 2 ** 30)
        return torch.maximum(scale_w, floor if scale_w.numel() > 1 else floor.max())

    def record(self) -> dict:
        """This layer's entry of the record file."""
        scale_w = self.weight_scales().cpu()
        entry = {"scale_d": float(self.input_quantizer.scale), "offset_d": int(self.input_quantizer.offset),
                 "scale_w": scale_w.tolist(), "offset_w": [0] * scale_w.numel()}
        if self.output_quantizer is not None:
            entry.update(scale_o=float(self.output_quantizer.scale), offset_o=int(self.output_quantizer.offset))
        if self.weight_quantizer.levels is not None:
            entry["nuq_levels"] = [int(v) for v in np.ravel(self.weight_quantizer.levels)]
        return entry
