"""The quantized layer of a calibration/simulation model: a float layer plus named quantizer submodules.

Quantization is per tensor, as in the deployed graph: one ActQuantizer per quantized tensor, shared by every
layer that reads it. While the simulation runs, a QuantizedValues mode hands the quantized value of a tensor to
*every* consumer (a residual add as well as the next conv), which is what the deploy model's single
QuantizeLinear/DequantizeLinear pair on that tensor does, so the simulation and the exported models agree.
"""
import math
import weakref

import numpy as np

import torch
from torch import nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from .config import LayerConfig
from .observers import OBSERVERS
from . import nuq
from .primitives import (act_qparams, channel_view, fake_quant, fake_quant_weight, quantize, quantize_bias,
                         weight_scales)


class QuantizedValues(TorchFunctionMode):
    """During one forward of the simulation: replaces each quantized tensor by its quantized value in every op."""

    def __init__(self):
        super().__init__()
        self.values = {}  # id(float tensor) -> (weakref to it, quantized tensor)

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

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*tree_map(self._swap, args), **tree_map(self._swap, kwargs or {}))


_ACTIVE: list[QuantizedValues] = []


def enter_simulation(module, args):
    """Forward pre-hook of the root model: quantized values flow to every consumer during this forward."""
    mode = QuantizedValues()
    mode.__enter__()
    _ACTIVE.append(mode)


def exit_simulation(module, args, output):
    if _ACTIVE:
        _ACTIVE.pop().__exit__(None, None, None)


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
            mode = _ACTIVE[-1] if _ACTIVE else None
            cached = mode.get(x) if mode is not None else None
            if cached is not None:
                return cached
            xq = fake_quant(x, self.scale, self.offset, self.params.num_bits)
            if mode is not None:
                mode.put(x, xq)
            return xq
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

    def scales(self, weight: torch.Tensor) -> torch.Tensor:
        return weight_scales(weight, self.params.num_bits, self.params.channel_wise, self.axis)

    def codes(self, weight: torch.Tensor) -> torch.Tensor:
        """INT8 codes as float, NUQ-snapped once a codebook is fitted."""
        scale = channel_view(self.scales(weight).to(weight.device), weight.dim(), self.axis)
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

    def fit_codebook(self, weight: torch.Tensor, input_power: torch.Tensor | None, groups: int) -> None:
        """Choose the NUQ levels minimising the output error: each weight counts by scale^2 * E[input^2]."""
        codes = self.codes(weight).cpu().numpy().astype(np.int64)
        scale = self.scales(weight).cpu().double().numpy()
        importance = np.broadcast_to((scale ** 2).reshape([-1] + [1] * (weight.dim() - 1)), codes.shape).copy()
        if input_power is not None:
            power = input_power.cpu().double().numpy().reshape(groups, -1)  # [groups, in_channels per group]
            per_out = np.repeat(power, weight.shape[0] // groups, axis=0)  # [out_channels, in_channels per group]
            importance *= per_out.reshape(per_out.shape + (1,) * (weight.dim() - 2))
        self.levels = nuq.codebooks(codes, importance, self.params.num_steps, self.params.codebook == "channel")
        self._table = torch.from_numpy(nuq.snap_table(self.levels)).float()

    def extra_repr(self):
        algo = f"nuq({self.params.num_steps} steps, per {self.params.codebook})" \
            if self.params.wts_algo == "nuq_quantize" else "arq"
        return f"{algo}, bits={self.params.num_bits}, channel_wise={self.params.channel_wise}"


class QuantLayer(nn.Module):
    """`layer` (BN already folded) run on fake-quantized input and weights through its own forward.

    `output_quantizer` is set when the output feeds an elementwise add: quantizing it lets the runtime run both
    the layer and the add on integers.
    """

    def __init__(self, layer: nn.Module, config: LayerConfig, input_quantizer: ActQuantizer, name: str, axis: int,
                 output_quantizer: ActQuantizer | None = None):
        super().__init__()
        self.layer, self.name, self.axis = layer, name, axis
        self.input_quantizer = input_quantizer
        self.weight_quantizer = WeightQuantizer(config.weight, axis)
        self.output_quantizer = output_quantizer
        self.input_moments = None  # running sums of each input channel's mean and mean square, and batch count
        self._moment_batches = 0

    def _observe_input(self, x: torch.Tensor) -> None:
        channel_dim = -1 if isinstance(self.layer, nn.Linear) else 1
        dims = [d for d in range(x.dim()) if d != channel_dim % x.dim()]
        x = x.detach().float()
        moments = torch.stack([x.mean(dims), x.pow(2).mean(dims)])
        self.input_moments = moments if self.input_moments is None else self.input_moments + moments
        self._moment_batches += 1

    def _per_weight(self, channel_values: torch.Tensor) -> torch.Tensor:
        """Expand per-input-channel values to the weight's [out, in per group] layout."""
        weight = self.layer.weight
        groups = getattr(self.layer, "groups", 1)
        per_group = channel_values.reshape(groups, -1)
        return per_group.repeat_interleave(weight.shape[0] // groups, dim=0)

    def finish_weights(self, bias_correction: bool = True) -> None:
        """After calibration: fit the NUQ codebook, then correct the bias for the weight quantization's shift of
        the output mean, (W_q - W) . E[x] per output channel (Nagel et al. 2019), so it is not left to compound."""
        if self.input_moments is None:
            return
        mean, power = (self.input_moments / self._moment_batches).to(self.layer.weight.device)
        self.input_moments = None
        weight = self.layer.weight
        if self.weight_quantizer.params.wts_algo == "nuq_quantize" and self.weight_quantizer.levels is None:
            self.weight_quantizer.fit_codebook(weight, power, getattr(self.layer, "groups", 1))
        if not bias_correction or self.axis != 0:
            return
        with torch.no_grad():
            error = (self.weight_quantizer(weight) - weight).reshape(weight.shape[0], weight.shape[1], -1).sum(2)
            shift = (error * self._per_weight(mean)).sum(1)
            if self.layer.bias is None:
                self.layer.bias = nn.Parameter(torch.zeros_like(shift))
            self.layer.bias -= shift

    def forward(self, x):
        if not self.input_quantizer.calibrated:
            self._observe_input(x)
        x = self.input_quantizer(x)
        weight = self.weight_quantizer(self.layer.weight)
        bias = self.layer.bias
        if bias is not None and self.input_quantizer.calibrated:
            # the deployed model adds the bias in INT32 on the accumulator grid: simulate that rounding too
            grid = self.input_quantizer.scale * self.weight_quantizer.scales(self.layer.weight).to(bias.device)
            bias = bias + (quantize_bias(bias, grid) * grid - bias).detach()
        y = functional_call(self.layer, {"weight": weight, "bias": bias}, (x,))
        return self.output_quantizer(y) if self.output_quantizer is not None else y

    def record(self) -> dict:
        """This layer's entry of the record file."""
        scale_w = self.weight_quantizer.scales(self.layer.weight).cpu()
        entry = {"scale_d": float(self.input_quantizer.scale), "offset_d": int(self.input_quantizer.offset),
                 "scale_w": scale_w.tolist(), "offset_w": [0] * scale_w.numel()}
        if self.output_quantizer is not None:
            entry.update(scale_o=float(self.output_quantizer.scale), offset_o=int(self.output_quantizer.offset))
        if self.weight_quantizer.levels is not None:
            entry["nuq_levels"] = [int(v) for v in np.ravel(self.weight_quantizer.levels)]
        return entry
