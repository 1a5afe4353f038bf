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


def _check_batch(x: torch.Tensor, layer: str) -> tuple[torch.Tensor, float, float]:
    """Flattened float data and its (min, max); NaN and Inf show up in min/max, which is cheaper than isfinite."""
    if x.numel() == 0:
        raise ValueError(f"layer '{layer}': empty calibration batch")
    x = x.detach().float().reshape(-1)
    lo, hi = (float(v) for v in torch.aminmax(x))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"layer '{layer}': calibration input holds NaN or Inf values")
    return x, lo, hi


def _largest(x: torch.Tensor, k: int, sample: torch.Tensor) -> torch.Tensor:
    """The k largest values of x, sorted; a threshold taken from `sample` avoids a topk over all of x."""
    k = min(k, x.numel())
    wanted = math.ceil(4 * k * sample.numel() / x.numel()) + 16
    if sample.numel() < x.numel() and wanted < sample.numel():
        candidates = x[x >= sample.topk(wanted).values[-1]]
        if candidates.numel() >= k:
            return candidates.topk(k).values
    return x.topk(k).values


def _sq_errors(v: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Summed squared error of quantizing v for each candidate (lo, hi, scale), the grid k * scale.

    All candidates at once, in chunks of v: few large tensor ops, not one small op per candidate.
    """
    lo, hi, scale = (t.to(v.device, torch.float32)[:, None] for t in (lo, hi, scale))
    total = torch.zeros(lo.shape[0], dtype=torch.float64, device=v.device)
    for chunk in v.split(1 << 16):
        total += ((torch.round(torch.clamp(chunk[None, :], lo, hi) / scale) * scale - chunk) ** 2).sum(1)
    return total


class IFMRObserver:
    """AMCT's IFMR: percentile bounds, then the clip_max (x search_range) minimising quantization MSE."""

    def __init__(self, params, asymmetric: bool, batch_num: int, layer: str = "", max_samples: int = 2 ** 19,
                 tail: int = 4096):
        self.params, self.asymmetric, self.batch_num, self.layer = params, asymmetric, batch_num, layer
        self.budget = max(1, max_samples // batch_num)
        self.tail = tail
        self.samples: list[torch.Tensor] = []
        self.top = self.bottom = None
        self.count = 0
        self._generator = torch.Generator().manual_seed(0)

    def observe(self, x: torch.Tensor) -> None:
        x, _, _ = _check_batch(x, self.layer)
        self.count += x.numel()
        if x.numel() > self.budget:
            sample = x[torch.randint(x.numel(), (self.budget,), generator=self._generator).to(x.device)]
        else:
            sample = x.clone()
        self.samples.append(sample)
        top, bottom = _largest(x, self.tail, sample), _largest(-x, self.tail, -sample)
        self.top = top if self.top is None else self._merge(self.top, top)
        self.bottom = bottom if self.bottom is None else self._merge(self.bottom, bottom)

    def _merge(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        both = torch.cat([a, b])
        return both.topk(min(self.tail, both.numel())).values

    def _kth(self, extremes: torch.Tensor, percentile: float) -> float:
        k = max(1, self.count - math.floor(percentile * self.count))
        if k <= extremes.numel():
            return float(extremes[k - 1])
        data = torch.cat(self.samples)  # beyond the exact tail: the percentile of the (sub)sample
        return float(data.quantile(percentile) if extremes is self.top else -data.quantile(1 - percentile))

    def _loss_data(self):
        """(sample, exact tails, sample weight) for estimating the summed quantization error of all the data.

        The extremes are kept exactly, because rare outliers dominate the clipping error and a uniform
        subsample misses them; the rest is the subsample, scaled up to the number of values it stands for.
        """
        data = torch.cat(self.samples)
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


def _error_antiderivative(x: np.ndarray, lo, hi, step) -> np.ndarray:
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
        x, lo, hi = _check_batch(x, self.layer)
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
        """Candidate (left, right) bin windows: every pair of tail masses from a log-spaced grid, and shrunk ranges.

        AMCT peels one side at a time (the side that removes fewer bins); with one-sided outlier gaps that path
        walks straight through the core. A grid of both tails, all scored, contains that path's good windows too.
        """
        csum = np.cumsum(self.hist)
        total = csum[-1]
        tails = np.concatenate([[0.0], np.logspace(-7, math.log10(0.25), 47)])
        left = np.minimum(np.searchsorted(csum, tails * total, side="right"), self.bins - 1)
        right = np.searchsorted(csum, (1 - tails) * total, side="left").clip(0, self.bins - 1)
        pairs = np.stack(np.meshgrid(left, right, indexing="ij"), -1).reshape(-1, 2)
        # and the range shrunk towards zero, for sparse outliers where no mass boundary marks a good cut
        zero = np.clip((0.0 - self.lo) / (self.hi - self.lo) * self.bins, 0, self.bins - 1)
        ratios = np.linspace(0.3, 1.0, 36)
        shrunk = np.stack([np.floor(zero - ratios * zero), np.ceil(zero + ratios * (self.bins - 1 - zero))], 1)
        pairs = np.concatenate([pairs, shrunk.astype(int)])
        return np.unique(pairs[pairs[:, 0] <= pairs[:, 1]], axis=0)

    def _errors(self, windows: np.ndarray, levels: int) -> np.ndarray:
        """L2 error of each window, the histogram taken as uniform within bins (closed form, no sampling)."""
        width = (self.hi - self.lo) / self.bins
        edges = self.lo + width * np.arange(self.bins + 1)
        density = self.hist / width
        errors = []
        for chunk in np.array_split(windows, max(1, len(windows) // 256)):
            lo = (self.lo + chunk[:, 0] * width)[:, None]
            hi = (self.lo + (chunk[:, 1] + 1) * width)[:, None]
            g = _error_antiderivative(edges[None, :], lo, hi, (hi - lo) / (levels - 1))
            errors.append((density[None, :] * np.diff(g, axis=1)).sum(1))
        return np.concatenate(errors)

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
