"""Non-uniform weight quantization (NUQ): INT8 weights restricted to a small codebook of INT8 levels.

The levels are the exact optimum of a weighted 1-D k-means on the INT8 grid (dynamic programming over the at
most 256 distinct codes), where each weight counts by its channel scale squared times the mean square of the
input it multiplies: the error minimised is that of the layer's output on the calibration data, not just of the
weights. The deploy model holds ordinary INT8 weights that take only the codebook values, so any INT8 runtime runs
it; the packed file stores ceil(log2(num_steps))-bit indices plus the codebooks.

Packed file (`<prefix>_nuq_weights.npz`, numpy's uncompressed zip): for each NUQ layer `L`,
`L.shape` (int64, the weight shape), `L.bits` (uint8, index width), `L.codebook` (int8, `[num_steps]` or
`[out_channels, num_steps]`), `L.indices` (uint8, the indices in C order, `bits` bits each, most significant
bit first, padded with zeros to a whole byte). `load_packed` restores the exact INT8 weights.
"""
import json
import math

import numpy as np

from .fileio import atomic_path


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
    few columns to spread each rounding error over; thin layers are small, so their codebooks cost little in all
    (EfficientNet-Lite0 NUQ-16, sim top-1: 87.25 instead of 85.6 with layer codebooks, at 0.548 instead of 0.521 of
    the INT8 bytes). Wide layers gain little from them."""
    if codebook != "auto":
        return codebook == "channel"
    per_channel = math.prod(shape) // shape[0]
    return per_channel < 8 * num_steps or num_steps * 8 <= 0.1 * per_channel * index_bits(num_steps)


def index_bits(num_steps: int) -> int:
    return max(1, math.ceil(math.log2(num_steps)))


def pack(codes: np.ndarray, codebook: np.ndarray) -> dict:
    """Packed arrays of one layer (see the module docstring)."""
    num_steps = codebook.shape[-1]
    bits = index_bits(num_steps)
    rows = codes.reshape(codebook.shape[0], -1) if codebook.ndim == 2 else codes.reshape(1, -1)
    books = codebook.reshape(rows.shape[0], num_steps)
    indices = np.stack([np.argmax(row[:, None] == book[None, :], axis=1) for row, book in zip(rows, books)])
    if not all(np.array_equal(book[i], row) for book, i, row in zip(books, indices, rows)):
        raise ValueError("weights take values outside their codebook")
    planes = np.unpackbits(indices.astype(np.uint8).reshape(-1, 1), axis=1)[:, 8 - bits:]
    return {"shape": np.array(codes.shape, dtype=np.int64), "bits": np.uint8(bits),
            "codebook": codebook.astype(np.int8), "indices": np.packbits(planes.reshape(-1))}


def unpack(entry: dict) -> np.ndarray:
    shape, bits, codebook = tuple(entry["shape"]), int(entry["bits"]), entry["codebook"]
    count = int(np.prod(shape))
    planes = np.unpackbits(entry["indices"])[:count * bits].reshape(count, bits)
    indices = (planes.astype(np.int64) << np.arange(bits - 1, -1, -1)).sum(1)
    books = codebook.reshape(-1, codebook.shape[-1])
    rows = indices.reshape(books.shape[0], -1)
    return np.stack([book[row] for book, row in zip(books, rows)]).reshape(shape).astype(np.int8)


def write_packed(path: str, layers: dict) -> None:
    """`layers`: name -> pack() dict; written atomically."""
    arrays = {f"{name}.{key}": value for name, entry in layers.items() for key, value in entry.items()}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def load_packed(path: str) -> dict:
    """Layer name -> exact INT8 weight array."""
    with np.load(path) as data:
        names = sorted({key.rsplit(".", 1)[0] for key in data.files})
        return {name: unpack({k: data[f"{name}.{k}"] for k in ("shape", "bits", "codebook", "indices")})
                for name in names}


def packed_bytes(entry: dict) -> int:
    return int(entry["indices"].nbytes + entry["codebook"].nbytes)


def flagged_names(mapping_file: str) -> set:
    """Names of the ops an ATC JSON dump marks `_fe_weight_compress`, with their original ONNX node names."""
    try:
        with open(mapping_file, encoding="utf-8") as f:
            dump = json.load(f)
        ops = [op for graph in dump["graph"] for op in graph["op"]]
    except FileNotFoundError:
        raise ValueError(f"{mapping_file}: mapping file not found") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f"{mapping_file}: not an ATC JSON dump of a model (expected graph[].op[] entries)") from None
    names = set()
    for op in ops:
        attrs = {a.get("key"): a.get("value", {}) for a in op.get("attr", [])}
        if attrs.get("_fe_weight_compress", {}).get("b"):
            names.add(op.get("name", ""))
            names.update(attrs.get("_datadump_original_op_names", {}).get("list", {}).get("s", []))
    return names
