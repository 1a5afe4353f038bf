"""AMCT's IFMR activation calibration: percentile bounds, then the clip (x search_range) of least quantization MSE.

It streams: memory per layer is bounded whatever the number of batches. It keeps the exact extreme values (for the
percentiles) and the data itself up to `max_samples` values, then a fixed-seed uniform subsample per batch, so small
calibrations are exact (spec 4.3) and large ones stay within a few MB per layer.
"""
import math

import numpy as np
import torch

from ..primitives import act_qparams, check_finite_range, flat_values

BLOCK = 256  # values per block whose extremes locate the tails


def _tails(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(the k largest values of flat `x` sorted descending, the k largest of -x likewise, min, max).

    One pass takes each block's max (another its min); the k largest values lie in the k blocks of largest maxima
    (a value outside them has k larger block maxima above it) and are at least the k-th of those maxima, so only
    those values of those blocks are searched: no top-k, mask or negated copy over all of x."""
    k = min(k, x.numel())
    whole = x.numel() // BLOCK * BLOCK
    blocks, rest = x[:whole].view(-1, BLOCK), x[whole:]
    maxima, minima = blocks.amax(1), blocks.amin(1)  # (two reductions are far faster than aminmax along a dim)
    lo, hi = float(torch.cat([minima, rest]).min()), float(torch.cat([maxima, rest]).max())  # NaN shows here
    found = []
    for extremes, largest in ((maxima, True), (minima, False)):
        if len(extremes) <= k:
            candidates = x
        else:
            bound = extremes.topk(k, largest=largest)
            candidates = torch.cat([blocks[bound.indices].reshape(-1), rest])
            threshold = bound.values[-1]
            candidates = candidates[candidates >= threshold] if largest else candidates[candidates <= threshold]
        found.append(candidates.topk(k, largest=largest).values)
    return found[0], -found[1], lo, hi


def _sq_errors(v: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Summed squared error of quantizing v for each candidate (lo, hi, scale), the grid k * scale.

    All candidates at once, in chunks of v: few large tensor ops, not one small op per candidate, in place on one
    buffer (a new tensor per op would cost the allocation and page faults of each). In float32, and again in
    float64 where float32's squares overflow (activations beyond about 1e19).
    """
    for dtype in (torch.float32, torch.float64):
        grid = [t.to(v.device, dtype)[:, None] for t in (lo, hi, scale)]
        total = torch.zeros(grid[0].shape[0], dtype=torch.float64, device=v.device)
        buffer = None
        for chunk in v.to(dtype).split(1 << 16):
            if buffer is None or buffer.shape[1] != chunk.numel():
                buffer = torch.empty(grid[0].shape[0], chunk.numel(), dtype=dtype, device=v.device)
            torch.clamp(chunk[None, :], grid[0], grid[1], out=buffer)
            total += buffer.div_(grid[2]).round_().mul_(grid[2]).sub_(chunk).square_().sum(1)
        if torch.isfinite(total).all():
            break
    return total


class IFMRObserver:
    """AMCT's IFMR: percentile bounds, then the clip_max (x search_range) minimising quantization MSE."""

    def __init__(self, params, asymmetric: bool, batch_num: int, layer: str = "", max_samples: int = 2 ** 19,
                 tail: int = 1024):
        self.params, self.asymmetric, self.batch_num, self.layer = params, asymmetric, batch_num, layer
        self.budget = max(1, max_samples // batch_num)
        # the exact extremes kept at each end: the default percentile (1 - 1e-6) of up to 1e9 values lies within
        # them; beyond, the sample's quantile serves
        self.tail = tail
        # the samples of all batches, in one buffer allocated at the first: many small tensors kept between the
        # large transient ones of each batch would fragment the heap, and the process would grow with the batches
        self.samples = None
        self.filled = 0
        self.top = self.bottom = None
        self.count = 0
        self._generator = torch.Generator().manual_seed(0)

    def observe(self, x: torch.Tensor) -> None:
        x = flat_values(x, self.layer)
        top, bottom, lo, hi = _tails(x, self.tail)
        check_finite_range(lo, hi, self.layer)
        self.count += x.numel()
        if x.numel() > self.budget:
            sample = x[torch.randint(x.numel(), (self.budget,), generator=self._generator).to(x.device)]
        else:
            sample = x
        if self.samples is None:
            self.samples = torch.empty(self.budget * self.batch_num, device=x.device)
        self.samples[self.filled:self.filled + sample.numel()] = sample
        self.filled += sample.numel()
        self.top = top if self.top is None else self._merge(self.top, top)
        self.bottom = bottom if self.bottom is None else self._merge(self.bottom, bottom)

    def _merge(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        both = torch.cat([a, b])
        return both.topk(min(self.tail, both.numel())).values

    def _kth(self, extremes: torch.Tensor, percentile: float) -> float:
        k = max(1, self.count - math.floor(percentile * self.count))
        if k <= extremes.numel():
            return float(extremes[k - 1])
        data = self.samples[:self.filled]  # beyond the exact tail: the percentile of the (sub)sample
        return float(data.quantile(percentile) if extremes is self.top else -data.quantile(1 - percentile))

    def _loss_data(self):
        """(sample, exact tails, sample weight) for estimating the summed quantization error of all the data.

        The extremes are kept exactly, because rare outliers dominate the clipping error and a uniform
        subsample misses them; the rest is the subsample, scaled up to the number of values it stands for.
        """
        data = self.samples[:self.filled]
        if data.numel() == self.count:
            return data, None, 1.0
        hi, lo = float(self.top[-1]), -float(self.bottom[-1])
        inner = data[(data < hi) & (data > lo)]
        rest = self.count - self.top.numel() - self.bottom.numel()
        return inner, torch.cat([self.top, -self.bottom]), rest / max(inner.numel(), 1)

    def compute(self, bounds=(-math.inf, math.inf)) -> tuple[float, float]:
        """Return (clip_min, clip_max); `bounds` is the range the producer guarantees (e.g. ReLU6: 0..6)."""
        p = self.params
        max_init = max(self._kth(self.top, p.max_percentile), 0.0)
        min_init = min(-self._kth(self.bottom, p.min_percentile), 0.0)
        max_init, min_init = min(max_init, bounds[1]), max(min_init, bounds[0])
        if not self.asymmetric:
            max_init = max(max_init, -min_init)
        data, tails, weight = self._loss_data()
        start, end = p.search_range
        clip_max = torch.tensor([min(max_init * float(r), bounds[1]) for r in np.arange(start, end, p.search_step)],
                                dtype=torch.float64)
        clip_min = torch.full_like(clip_max, min_init) if self.asymmetric else -clip_max
        scale = torch.tensor([act_qparams(a, b, p.num_bits, self.asymmetric)[0]
                              for a, b in zip(clip_min.tolist(), clip_max.tolist())])
        loss = _sq_errors(data, clip_min, clip_max, scale) * weight
        if tails is not None:
            loss += _sq_errors(tails, clip_min, clip_max, scale)
        clip_max = float(clip_max[int(torch.argmin(loss))])
        return (min_init if self.asymmetric else -clip_max), clip_max
