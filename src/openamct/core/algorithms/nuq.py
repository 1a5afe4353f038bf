"""Non-uniform weight quantization (NUQ): INT8 weights restricted to a small codebook of INT8 levels.

The levels are first the exact optimum of a weighted 1-D k-means on the INT8 grid (dynamic programming over the at
most 256 distinct codes), where each weight counts by its channel scale squared times the mean square of the
input it multiplies: the error minimised is that of the layer's output on the calibration data, not just of the
weights. With GPTQ, the levels are then refitted to GPTQ's choice by least squares on the output error, alternating
with GPTQ on the new levels (`refit_levels`). The deploy model holds ordinary INT8 weights that take only the
codebook values, so any INT8 runtime runs it; onnx_export/packed.py stores them as indices plus codebooks.
"""
import math

import numpy as np
import torch

from ..primitives import channel_view, qrange, quantize
from .gptq import ridged


def optimal_levels(counts: np.ndarray, num_steps: int) -> np.ndarray:
    """At most `num_steps` integer levels minimising sum(counts[v] * (v - nearest level)^2), v = -128..127."""
    values = np.nonzero(counts > 0)[0]
    if len(values) <= num_steps:
        return (values - 128).astype(np.int32)
    w = counts[values].astype(np.float64)
    v = (values - 128).astype(np.float64)
    cw, cwv, cwv2 = (np.concatenate([[0.0], np.cumsum(a)]) for a in (w, w * v, w * v * v))
    n = len(values)
    a, b = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")  # cluster = values[a..b]
    sw, swv, swv2 = cw[b + 1] - cw[a], cwv[b + 1] - cwv[a], cwv2[b + 1] - cwv2[a]
    with np.errstate(invalid="ignore", divide="ignore"):
        center = np.round(swv / sw)
    cost = np.where(a <= b, swv2 - 2 * center * swv + center * center * sw, np.inf)
    best = cost[0].copy()  # best[b]: one cluster covering values[0..b]
    choice = [np.zeros(n, dtype=int)]
    for _ in range(1, num_steps):
        total = np.concatenate([[np.inf], best[:-1]])[:, None] + cost  # last cluster starts at a
        start = np.argmin(total, axis=0)
        best = total[start, np.arange(n)]
        choice.append(start)
    levels, end = [], n - 1
    for k in range(num_steps - 1, -1, -1):
        start = choice[k][end] if k else 0
        levels.append(int(center[start, end]))
        end = start - 1
        if end < 0:
            break
    return np.unique(np.array(levels, dtype=np.int32))


def snap_table(levels: np.ndarray) -> np.ndarray:
    """[rows, 256] table: code v (index v + 128) -> its nearest level (ties to the lower one); one row per codebook."""
    books = np.sort(np.atleast_2d(np.asarray(levels)), axis=1)
    grid = np.arange(-128, 128)
    nearest = np.argmin(np.abs(books[:, None, :] - grid[None, :, None]), axis=2)
    return np.take_along_axis(books, nearest, axis=1)


def snap(codes: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """INT8 codes (output channels first) replaced by their nearest codebook level."""
    table = snap_table(levels)
    rows = codes.reshape(table.shape[0], -1) if table.shape[0] > 1 else codes.reshape(1, -1)
    return np.take_along_axis(table, rows.astype(np.int64) + 128, axis=1).reshape(codes.shape).astype(codes.dtype)


def codebooks(codes: np.ndarray, importance: np.ndarray, num_steps: int, per_channel: bool) -> np.ndarray:
    """Levels for a layer's INT8 `codes` (output channels first); `importance` has the same shape."""
    rows = codes.reshape(codes.shape[0], -1) if per_channel else codes.reshape(1, -1)
    weights = importance.reshape(rows.shape)
    out = []
    for row, weight in zip(rows, weights):
        present = np.bincount(row.astype(np.int64) + 128, minlength=256)
        # a tiny share of the plain count keeps codes whose importance is 0 (dead inputs) in play
        counts = np.bincount(row.astype(np.int64) + 128, weights=weight, minlength=256) + 1e-12 * present
        levels = optimal_levels(counts, num_steps)
        out.append(np.pad(levels, (0, num_steps - len(levels)), mode="edge"))
    return np.stack(out) if per_channel else out[0]


def per_channel_codebooks(codebook: str, shape, num_steps: int) -> bool:
    """Whether a layer of weight `shape` (output channels first) gets one codebook per output channel: "channel"
    always, "layer" never, "auto" where the layer is thin (under 8 x num_steps weights a channel) or where the
    codebooks (num_steps bytes a channel) add at most 10% to its packed indices.

    A channel's own levels fit it far better than a shared codebook where a channel has few weights, for GPTQ has
    few columns to spread each rounding error over; thin layers are small, so their codebooks cost little in all.
    Wide layers gain little from them."""
    if codebook != "auto":
        return codebook == "channel"
    per_channel = math.prod(shape) // shape[0]
    return per_channel < 8 * num_steps or num_steps * 8 <= 0.1 * per_channel * index_bits(num_steps)


def index_bits(num_steps: int) -> int:
    return max(1, math.ceil(math.log2(num_steps)))


def size_rule(shape, num_steps: int, codebook: str = "auto") -> bool:
    """Without a mapping file, NUQ goes to the Conv2d/Linear layers where it saves at least a quarter of the INT8
    weight bytes, its codebooks (`codebook`, as per_channel_codebooks decides) counted, and that have at least
    2 x num_steps weights per output channel. A layer that saves less pays NUQ's accuracy for little: a NUQ-32
    layer of 80 weights per channel, with the per-channel codebooks a layer that thin needs, is larger than INT8.
    With fewer weights per channel, too few share each channel's scale for GPTQ to make up for the coarse levels
    (a depthwise conv loses most of NUQ-16's accuracy)."""
    count = math.prod(shape)
    books = shape[0] if per_channel_codebooks(codebook, shape, num_steps) else 1
    packed = count * index_bits(num_steps) / 8 + books * num_steps
    return count // shape[0] >= 2 * num_steps and packed <= 0.75 * count


def fit_codebook(quantizer, weight: torch.Tensor, importance: torch.Tensor) -> None:
    """Set the quantizer's levels to those minimising sum(importance * (weight - dequantized level)^2) over
    `weight`'s INT8 codes; `importance` (broadcast to the weight's shape) is each weight's share of the output
    error (the mean square of the input it multiplies)."""
    scale = channel_view(quantizer.scales(weight).to(weight.device), weight.dim(), quantizer.axis)
    codes = quantize(weight.detach(), scale, 0, quantizer.params.num_bits)
    importance = torch.broadcast_to(importance, weight.shape) * scale ** 2
    per_channel = per_channel_codebooks(quantizer.params.codebook, weight.shape, quantizer.params.num_steps)
    quantizer.set_levels(codebooks(codes.cpu().numpy().astype(np.int64), importance.cpu().double().numpy(),
                                   quantizer.params.num_steps, per_channel))


def refit_levels(weight: torch.Tensor, chosen: torch.Tensor, hessian: torch.Tensor, quantizer,
                 damp: float = 0.01) -> torch.Tensor:
    """The NUQ levels given which level each weight of `chosen` (GPTQ's weights) takes: the least-squares levels of
    the output error tr((W - Q) H (W - Q)^T), rounded to the INT8 grid (as GPTVQ updates its codebook, van Baalen
    et al. 2024). Sets the quantizer's levels and returns the weights on them."""
    shape, num_steps = weight.shape, quantizer.params.num_steps
    w = weight.detach().double().reshape(shape[0], -1)
    device = w.device
    h = ridged(hessian.to(device), damp)
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
    quantizer.set_levels(levels if books.shape[0] > 1 else levels[0])
    return new.reshape(shape).to(weight.dtype)
