"""Activation range observers: IFMR (percentile init + clip search) and HFMG (merged histograms).

Both stream: memory per layer is bounded whatever the number of batches. IFMR keeps the exact extreme values
(for the percentiles) and the data itself up to `max_samples` values, then a fixed-seed uniform subsample per batch,
so small calibrations are exact (spec 4.3) and large ones stay within a few MB per layer.
HFMG keeps one histogram, merged across batches by re-binning onto the union range (spec 4.4).
"""
import math

import numpy as np
import torch

from .primitives import act_qparams


def _check_batch(x: torch.Tensor, layer: str) -> torch.Tensor:
    if x.numel() == 0:
        raise ValueError(f"layer '{layer}': empty calibration batch")
    x = x.detach().float().reshape(-1)
    if not torch.isfinite(x).all():
        raise ValueError(f"layer '{layer}': calibration input holds NaN or Inf values")
    return x


class IFMRObserver:
    """AMCT's IFMR: percentile bounds, then the clip_max (x search_range) minimising quantization MSE."""

    def __init__(self, params, asymmetric: bool, batch_num: int, layer: str = "", max_samples: int = 2 ** 21,
                 tail: int = 4096):
        self.params, self.asymmetric, self.batch_num, self.layer = params, asymmetric, batch_num, layer
        self.budget = max(1, max_samples // batch_num)
        self.tail = tail
        self.samples: list[torch.Tensor] = []
        self.top = self.bottom = None
        self.count = 0
        self._generator = torch.Generator().manual_seed(0)

    def observe(self, x: torch.Tensor) -> None:
        x = _check_batch(x, self.layer)
        self.count += x.numel()
        k = min(self.tail, x.numel())
        top, bottom = x.topk(k).values, (-x).topk(k).values
        self.top = top if self.top is None else torch.cat([self.top, top]).topk(min(self.tail, self.top.numel() + k)).values
        self.bottom = bottom if self.bottom is None else torch.cat([self.bottom, bottom]).topk(
            min(self.tail, self.bottom.numel() + k)).values
        if x.numel() > self.budget:
            index = torch.randint(x.numel(), (self.budget,), generator=self._generator).to(x.device)
            x = x[index]
        self.samples.append(x.clone())

    def _kth(self, extremes: torch.Tensor, percentile: float) -> float:
        k = max(1, self.count - math.floor(percentile * self.count))
        if k <= extremes.numel():
            return float(extremes[k - 1])
        data = torch.cat(self.samples)  # beyond the exact tail: the percentile of the (sub)sample
        return float(data.quantile(percentile) if extremes is self.top else -data.quantile(1 - percentile))

    def compute(self, bounds=(-math.inf, math.inf)) -> tuple[float, float]:
        """Return (clip_min, clip_max); `bounds` is the range the producer guarantees (e.g. ReLU6: 0..6)."""
        p = self.params
        max_init = max(self._kth(self.top, p.max_percentile), 0.0)
        min_init = min(-self._kth(self.bottom, p.min_percentile), 0.0)
        max_init, min_init = min(max_init, bounds[1]), max(min_init, bounds[0])
        data = torch.cat(self.samples)
        if not self.asymmetric:
            max_init = max(max_init, -min_init)
        start, end = p.search_range
        ratios = np.arange(start, end, p.search_step)
        best = (math.inf, max_init)
        for r in ratios:
            clip_max = min(max_init * float(r), bounds[1])
            clip_min = min_init if self.asymmetric else -clip_max
            scale, _ = act_qparams(clip_min, clip_max, p.num_bits, self.asymmetric)
            clamped = data.clamp(clip_min, clip_max)
            loss = float(((torch.round(clamped / scale) * scale - data) ** 2).mean())
            if loss < best[0]:
                best = (loss, clip_max)
        clip_max = best[1]
        return (min_init if self.asymmetric else -clip_max), clip_max


def _error_antiderivative(x: np.ndarray, lo: float, hi: float, step: float) -> np.ndarray:
    """G with G(b) - G(a) = integral over [a, b] of (t - Q(t))^2 dt, Q = nearest level of lo + k*step clamped to [lo, hi]."""
    inside = np.clip(x, lo, hi)
    u = (inside - lo) / step + 0.5
    n = np.floor(u)
    frac = u - n
    g = step ** 3 * (n / 12.0 + ((frac - 0.5) ** 3 + 0.125) / 3.0)
    g = g + np.where(x > hi, (x - hi) ** 3 / 3.0, 0.0) - np.where(x < lo, (lo - x) ** 3 / 3.0, 0.0)
    return g


class HFMGObserver:
    """AMCT's HFMG: a histogram merged over batches, then the L2-optimal window found by peeling the tails."""

    def __init__(self, params, asymmetric: bool, batch_num: int, layer: str = ""):
        self.params, self.asymmetric, self.layer = params, asymmetric, layer
        self.bins = params.num_of_bins
        self.hist = None
        self.lo = self.hi = 0.0

    def observe(self, x: torch.Tensor) -> None:
        x = _check_batch(x, self.layer)
        lo, hi = float(x.min()), float(x.max())
        if self.hist is not None:
            lo, hi = min(lo, self.lo), max(hi, self.hi)
        if hi <= lo:
            hi = lo + 1e-8
        new = torch.histc(x, self.bins, lo, hi).double().cpu().numpy()
        if self.hist is not None:
            new += self._rebin(lo, hi)
        self.hist, self.lo, self.hi = new, lo, hi

    def _rebin(self, lo: float, hi: float) -> np.ndarray:
        """The current histogram spread uniformly within its bins onto `bins` bins over [lo, hi]."""
        old_edges = np.linspace(self.lo, self.hi, self.bins + 1)
        cdf = np.concatenate([[0.0], np.cumsum(self.hist)])
        new_edges = np.linspace(lo, hi, self.bins + 1)
        return np.diff(np.interp(new_edges, old_edges, cdf))

    def _windows(self) -> np.ndarray:
        """Candidate (left, right) bin windows: peel 1e-5 of the mass from the side that removes fewer bins."""
        total = self.hist.sum()
        csum = np.cumsum(self.hist)
        left, right, alpha, beta = 0, self.bins - 1, 0.0, 1.0
        windows = [(left, right)]
        step = 1e-5
        while alpha < beta and right - left + 1 > self.bins // 4:
            next_left = int(np.searchsorted(csum, (alpha + step) * total, side="left"))
            next_right = int(np.searchsorted(csum, (beta - step) * total, side="left"))
            if next_left - left > right - next_right:
                right, beta = min(right, max(next_right, left)), beta - step
            else:
                left, alpha = max(left, min(next_left, right)), alpha + step
            if windows[-1] != (left, right):
                windows.append((left, right))
        return np.array(windows)

    def _errors(self, windows: np.ndarray, levels: int) -> np.ndarray:
        width = (self.hi - self.lo) / self.bins
        edges = self.lo + width * np.arange(self.bins + 1)
        density = self.hist / width
        errors = np.empty(len(windows))
        for i, (left, right) in enumerate(windows):
            lo, hi = self.lo + left * width, self.lo + (right + 1) * width
            step = (hi - lo) / (levels - 1)
            g = _error_antiderivative(edges, lo, hi, step)
            errors[i] = float((density * np.diff(g)).sum())
        return errors

    def compute(self, bounds=(-math.inf, math.inf)) -> tuple[float, float]:
        windows = self._windows()
        errors = self._errors(windows, 2 ** self.params.num_bits)
        left, right = windows[int(np.argmin(errors))]
        width = (self.hi - self.lo) / self.bins
        clip_min, clip_max = self.lo + left * width, self.lo + (right + 1) * width
        clip_min, clip_max = min(max(clip_min, bounds[0]), 0.0), max(min(clip_max, bounds[1]), 0.0)
        if not self.asymmetric:
            bound = max(clip_max, -clip_min)
            return -bound, bound
        return clip_min, clip_max


OBSERVERS = {"ifmr": IFMRObserver, "hfmg": HFMGObserver}
