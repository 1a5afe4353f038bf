"""Quantizers: the PTQ activation quantizer (observes while calibrating, then fake-quantizes), the ARQ/NUQ weight
quantizer, and the learned quantizers of QAT (ULQ activation ranges, ulq_retrain weight scales).

Activation quantizers hand their quantized value to every consumer of the tensor (simulation.shared_quantized)
and requantize a quantized layer's accumulator in one step where they can (simulation.requantize).
"""
import math

import torch
import torch.distributed as dist
from torch import nn

from .algorithms import OBSERVERS, nuq
from .algorithms.ifmr import IFMRObserver
from .primitives import (
    FLT_EPSILON,
    act_qparams,
    channel_rows,
    channel_view,
    fake_quant,
    fake_quant_weight,
    qrange,
    quantize,
    round_ste,
    weight_scales,
)
from .simulation import SharedQuantizer, requantize, shared_quantized


class ActQuantizer(SharedQuantizer, nn.Module):
    """Observes a tensor while calibrating, then fake-quantizes it with the computed scale/offset."""

    def __init__(self, params, asymmetric: bool, batch_num: int, bounds, layer: str):
        super().__init__()
        self.params, self.asymmetric, self.batch_num, self.layer = params, asymmetric, batch_num, layer
        self.bounds = tuple(bounds) if bounds else (-math.inf, math.inf)
        self.observer = OBSERVERS[params.act_algo](params, asymmetric, batch_num, layer)
        self.batches_seen = 0
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("offset", torch.tensor(0.0))
        self.calibrated = False
        self.override = None  # replaces forward while block reconstruction learns the scale

    @property
    def passes_through(self) -> bool:
        return not self.calibrated

    def forward(self, x):
        if self.override is not None:
            return self.override(x)
        if self.calibrated:
            return shared_quantized(x, lambda v: requantize(v, self.scale, self.offset, self.params.num_bits))
        if self.batches_seen < self.batch_num and self.first_sight(x):  # AMCT ignores batches beyond batch_num
            self.observer.observe(x)
            self.batches_seen += 1
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
    then snapped to the layer's codebook (fitted after calibration, see algorithms/nuq.py)."""

    def __init__(self, params, axis: int):
        super().__init__()
        self.params, self.axis = params, axis
        self.levels = None  # NUQ codebook(s), int array [num_steps] or [out_channels, num_steps]
        self.table = None  # NUQ: [1 or out_channels, 256] code -> its codebook level
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
        if self.table is None:
            return codes
        table = self.table.to(weight.device)
        rows = (codes.reshape(table.shape[0], -1) if table.shape[0] > 1 else codes.reshape(1, -1)).long() + 128
        return torch.gather(table, 1, rows).reshape(codes.shape).to(codes.dtype)

    def forward(self, weight):
        if self.table is None:
            return fake_quant_weight(weight, self.scales(weight).to(weight.device), self.params.num_bits, self.axis)
        scale = channel_view(self.scales(weight).to(weight.device), weight.dim(), self.axis)
        return weight + (self.codes(weight) * scale - weight).detach()

    def set_levels(self, levels) -> None:
        """Restrict the codes to the NUQ codebook(s) `levels` from now on."""
        self.levels = levels
        self.table = torch.from_numpy(nuq.snap_table(levels)).float()

    def extra_repr(self):
        algo = f"nuq({self.params.num_steps} steps, per {self.params.codebook})" \
            if self.params.nuq else "arq"
        return f"{algo}, bits={self.params.num_bits}, channel_wise={self.params.channel_wise}"


class ULQActQuantizer(SharedQuantizer, nn.Module):
    """An activation quantizer with a learned clip range (AMCT's ULQ).

    Training forward: scale = (clip_max - clip_min) / (2^b - 1), offset = round(qmin - clip_min / scale) (rounded
    with a straight-through gradient), then fake quantization. Autograd through this gives AMCT's ULQ gradients:
    inside the range, d/d clip_max = (round(x/s) - x/s) / (2^b - 1) and d/d clip_min its negative; above the range
    d/d clip_max = 1, below it d/d clip_min = 1; the input's gradient is straight-through inside, zero outside.
    """

    def __init__(self, params, batch_num: int, bounds, layer: str, data):
        super().__init__()
        self.params, self.batch_num, self.layer = params, batch_num, layer
        self.asymmetric = True
        self.bounds = tuple(bounds) if bounds else (-math.inf, math.inf)
        self.fixed_min = data.fixed_min if data.fixed_min is not None else self.bounds[0] >= 0
        given = data.clip_max is not None
        self.clip_max = nn.Parameter(torch.tensor(float(data.clip_max) if given else 1.0))
        self.clip_min = nn.Parameter(torch.tensor(float(data.clip_min) if given and not self.fixed_min else 0.0),
                                     requires_grad=not self.fixed_min)
        self.register_buffer("initialized", torch.tensor(given))
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("offset", torch.tensor(0.0))
        self.observer = None if given else IFMRObserver(params, True, batch_num, layer)
        self.batches_seen = 0

    @property
    def calibrated(self) -> bool:
        """In eval mode once initialised the layers compute as the deployed model does (see QuantLayer)."""
        return bool(self.initialized) and not self.training

    def clip_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The learned range, guarded so that it never collapses or changes sign, and within the range its
        producer guarantees (ReLU6: 0..6): codes beyond it are never used, and a range a rounding error above 6
        keeps the Clip in the deployed graph (ORT 1.30 then fails to load the model: two nodes named alike)."""
        clip_max = self.clip_max.clamp(min=1e-4, max=max(self.bounds[1], 1e-4))
        clip_min = torch.zeros_like(clip_max) if self.fixed_min else self.clip_min.clamp(min=self.bounds[0], max=0.0)
        return clip_min, clip_max

    def forward(self, x):
        if not self.initialized:
            return shared_quantized(x, self._initialising)
        if self.training:
            return shared_quantized(x, self._learned)
        with torch.no_grad():
            scale, offset = act_qparams(*self.clip_range(), self.params.num_bits, True)
            self.scale.fill_(scale)
            self.offset.fill_(offset)
        return shared_quantized(x, lambda v: requantize(v, self.scale, self.offset, self.params.num_bits))

    def _learned(self, x):
        qmin, qmax = qrange(self.params.num_bits)
        clip_min, clip_max = self.clip_range()
        scale = (clip_max - clip_min) / (qmax - qmin)
        return fake_quant(x, scale, round_ste(qmin - clip_min / scale), self.params.num_bits)

    def _initialising(self, x):
        """IFMR observes the first batch_num batches; meanwhile each batch is quantized to its own min/max."""
        if self.first_sight(x):
            self.observer.observe(x)
            self.batches_seen += 1
        lo, hi = (float(v) for v in torch.aminmax(x.detach()))
        scale, offset = act_qparams(0.0 if self.fixed_min else lo, hi, self.params.num_bits, True)
        out = fake_quant(x, scale, offset, self.params.num_bits)
        if self.batches_seen >= self.batch_num:
            self._initialise()
        return out + 0.0 * (self.clip_max + self.clip_min)  # DDP: every trained parameter takes part in each step

    def _initialise(self) -> None:
        clip = torch.tensor(self.observer.compute(self.bounds), dtype=torch.float64, device=self.clip_max.device)
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world > 1:  # every rank starts from the same range: the mean of the ranks' IFMR results
            dist.all_reduce(clip)
            clip /= world
        with torch.no_grad():
            self.clip_min.fill_(float(clip[0]))
            self.clip_max.fill_(float(clip[1]))
            self.initialized.fill_(True)
        self.observer = None

    def extra_repr(self):
        state = f"clip=[{self.clip_min.item():.4g}, {self.clip_max.item():.4g}]" if self.initialized else \
            f"initialising ({self.batches_seen}/{self.batch_num} batches)"
        return f"ulq, bits={self.params.num_bits}, fixed_min={self.fixed_min}, {state}"


def least_error_scales(weight: torch.Tensor, num_bits: int, channel_wise: bool, axis: int) -> torch.Tensor:
    """Per channel (or tensor), the fraction (0.3 to 1 in steps of 0.01) of the max-abs scale with the least squared
    quantization error."""
    ratios = torch.linspace(0.3, 1.0, 71)
    w = channel_rows(weight, channel_wise, axis)
    qmin, qmax = qrange(num_bits)
    full = w.abs().amax(1) / qmax
    full = torch.where(full < FLT_EPSILON, torch.ones_like(full), full)  # all-zero channels: scale 1, as ARQ
    best, best_error = full.clone(), torch.full_like(full, math.inf)
    for ratio in ratios.tolist():
        scale = full * ratio
        error = ((torch.clamp(torch.round(w / scale[:, None]), qmin, qmax) * scale[:, None] - w) ** 2).sum(1)
        better = error < best_error
        best, best_error = torch.where(better, scale, best), torch.minimum(error, best_error)
    return best


class LearnedWeightQuantizer(WeightQuantizer):
    """ulq_retrain: the per-channel (or per-tensor) scale is learned; fake_quant's straight-through rounding gives
    it the LSQ gradient (round(w/s) - w/s inside the range, the range end outside). It is learned as its logarithm:
    an optimizer step then changes every channel's scale by a similar fraction, whether it is 1e-4 or 1."""

    def __init__(self, params, axis: int, weight: torch.Tensor):
        super().__init__(params, axis)
        self.log_scale = nn.Parameter(least_error_scales(weight, params.num_bits, params.channel_wise, axis).log())

    def scales(self, weight: torch.Tensor) -> torch.Tensor:
        return self.log_scale.exp()

    def forward(self, weight):
        return fake_quant_weight(weight, self.scales(weight), self.params.num_bits, self.axis)

    def extra_repr(self):
        return f"ulq_retrain, bits={self.params.num_bits}, channel_wise={self.params.channel_wise}"
