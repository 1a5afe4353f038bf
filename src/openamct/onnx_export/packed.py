"""NUQ packed storage: each NUQ layer's INT8 weights as ceil(log2(num_steps))-bit indices plus its codebook(s).

Packed file (`<prefix>_nuq_weights.npz`, numpy's uncompressed zip): for each NUQ layer `L`,
`L.shape` (int64, the weight shape), `L.bits` (uint8, index width), `L.codebook` (int8, `[num_steps]` or
`[out_channels, num_steps]`), `L.indices` (uint8, the indices in C order, `bits` bits each, most significant
bit first, padded with zeros to a whole byte). `load_packed` restores the exact INT8 weights.
"""
import os

import numpy as np
from onnx import numpy_helper

from ..core import log
from ..core.algorithms.nuq import index_bits
from ..core.fileio import atomic_path
from .qdq import layer_codes


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


def write_nuq_weights(fused, mapping: dict, records: dict, directory: str, stem: str, paths: dict) -> dict | None:
    """For NUQ layers: write `<stem>nuq_weights.npz` (into `paths["nuq_weights"]`) and log the weight bytes of
    every quantized layer (fp32, INT8, packed); returns that table, or None without NUQ layers."""
    nuq_layers = [name for name in mapping if len(records[name].nuq_levels)]
    if not nuq_layers:
        return None
    inits = {i.name: i for i in fused.graph.initializer}
    packed, table = {}, {}
    for name, entry in mapping.items():
        weight = numpy_helper.to_array(inits[entry["weight"]])
        codes = layer_codes(entry, records[name], weight).astype(np.int8)
        if name in nuq_layers:
            levels = np.asarray(records[name].nuq_levels, dtype=np.int8).reshape(-1, entry["num_steps"])
            packed[name] = pack(codes, levels if levels.shape[0] > 1 else levels[0])
        table[name] = {"fp32": 4 * weight.size, "int8": weight.size,
                       "nuq_packed": packed_bytes(packed[name]) if name in packed else weight.size}
    path = os.path.join(directory or ".", f"{stem}nuq_weights.npz")
    write_packed(path, packed)
    paths["nuq_weights"] = path
    log.info(f"The model file is saved in {os.path.realpath(path)}", "Utils")
    for name, row in table.items():
        log.info(f"  {name}: weight bytes fp32 {row['fp32']}, int8 {row['int8']}, nuq packed {row['nuq_packed']}",
                 "NUQ")
    total = {key: sum(row[key] for row in table.values()) for key in ("fp32", "int8", "nuq_packed")}
    log.info(f"Weight bytes of the quantized layers: fp32 {total['fp32']}, uniform int8 {total['int8']}, "
             f"nuq packed {total['nuq_packed']} ({total['nuq_packed'] / total['int8']:.3f} of int8; "
             f"{len(nuq_layers)} of {len(table)} layers NUQ)", "NUQ")
    return {"layers": table, "total": total}
