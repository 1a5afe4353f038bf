"""AMCT's HFMG activation calibration: one histogram merged across batches by re-binning onto the union range
(spec 4.4), then the window of least L2 quantization error. Memory per layer is one histogram."""
import math

import numpy as np
import torch

from ..primitives import observed_values


def _error_antiderivative(x: np.ndarray, lo, hi, step) -> np.ndarray:
    """G with G(b) - G(a) = integral over [a, b] of (t - Q(t))^2 dt, Q = nearest level of lo + k*step clamped to
    [lo, hi]."""
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
        x, lo, hi = observed_values(x, self.layer)
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
