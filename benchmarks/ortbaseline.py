"""ONNX Runtime baseline: static QDQ quantization, inference, latency, op census.

Everything here uses stock ``onnxruntime.quantization`` so that it can serve as
the reference against which hand-built QDQ models are compared.  torch is not
imported; the module needs only numpy, onnx and onnxruntime.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

_METHODS = ("MinMax", "Percentile", "Entropy")


# --------------------------------------------------------------------------
# quantization (runs in a child process so its peak RSS can be measured)
# --------------------------------------------------------------------------


def _static_batch(model_path: str, input_name: str):
    """Return the input's batch dim if it is a fixed int, else None."""
    import onnx

    model = onnx.load(model_path, load_external_data=False)
    for inp in model.graph.input:
        if inp.name == input_name:
            dim0 = inp.type.tensor_type.shape.dim[0]
            return dim0.dim_value if dim0.HasField("dim_value") else None
    raise KeyError(f"input {input_name!r} not in {model_path}")


def proc_mem_mb(field: str = "VmHWM") -> float | None:
    """This process's ``VmHWM`` (peak RSS) or ``VmRSS`` in MB from /proc/self/status; None off Linux.

    Unlike ``ru_maxrss``, VmHWM belongs to the current address space only: Linux carries the
    parent's RSS at fork time over into a child's ru_maxrss across exec, so a child started from a
    big process (e.g. one holding a model and a data set) reports at least the parent's size.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _quantize_child(args: dict) -> dict:
    """Body of the child process: pre-process, then quantize_static (QDQ)."""
    import onnxruntime.quantization as oq

    base_rss_mb = proc_mem_mb()
    calib = np.load(args["calib"], mmap_mode="r")
    src, out, name = args["src"], args["out"], args["input_name"]
    fixed = _static_batch(src, name)  # also checks the input name, before any file is written
    batch = fixed or args["batch"] or 1
    t0 = time.perf_counter()

    pre = out + ".pre.onnx"
    info = {"preprocessed": True, "preprocess_error": None}
    try:
        oq.quant_pre_process(src, pre)
        model_in = pre
    except Exception as e:
        info.update(preprocessed=False, preprocess_error=f"{type(e).__name__}: {e}")
        model_in = src

    class Reader(oq.CalibrationDataReader):
        def __init__(self):
            self.i = 0

        def get_next(self):
            if self.i >= len(calib):
                return None
            x = np.ascontiguousarray(calib[self.i:self.i + batch], dtype=np.float32)
            self.i += batch
            # a fixed-batch model cannot take a short last batch: drop it
            if len(x) != batch and fixed:
                return None
            return {name: x}

        def rewind(self):
            self.i = 0

    try:
        oq.quantize_static(
            model_in, out, Reader(),
            quant_format=oq.QuantFormat.QDQ,
            per_channel=True,
            activation_type=oq.QuantType.QUInt8,
            weight_type=oq.QuantType.QInt8,
            calibrate_method=getattr(oq.CalibrationMethod, args["method"]),
            extra_options=args.get("extra_options") or {},
        )
    finally:
        if os.path.exists(pre):
            os.remove(pre)
    seconds = time.perf_counter() - t0
    info.update(seconds=seconds, calib_batch=batch, child_base_rss_mb=base_rss_mb, child_vm_hwm_mb=proc_mem_mb())
    return info


_CHILD_CODE = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("_ortbaseline_child", sys.argv[1])
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
res = mod._quantize_child(json.loads(sys.argv[2]))
open(sys.argv[3], "w").write(json.dumps(res))
"""


def ort_quantize_static(fp32_onnx: str, calib: np.ndarray, out_path: str, method: str,
                        input_name: str = "input", batch: int | None = None,
                        extra_options: dict | None = None) -> dict:
    """Static QDQ quantization (per-channel int8 weights, uint8 activations).

    Runs ``quant_pre_process`` (skipped, and reported, if it raises) and
    ``quantize_static`` in a fresh Python child process.  ``calib`` is
    (N,3,224,224) float32, fed ``batch`` images per call (default 1; a fixed
    batch dim in the model overrides it).  ORT's calibrators keep every
    batch's activations and merge per-batch stats, so the batch size does not
    change the scales; batch 1 gave the lowest peak RSS (MinMax: ~340 vs
    ~590 MB for 32 images on a toy net) at about the same speed.

    Note: with quantize_static, "Entropy" uses ORT's defaults num_bins=128 =
    num_quantized_bins=128, which leaves a single KL candidate (the full
    range), so it usually reproduces MinMax exactly.  extra_options is
    passed through (e.g. {"CalibPercentile": 99.99}).

    Returns {"path", "seconds", "peak_rss_mb", ...}: ``seconds`` is the
    pre-process+quantize time measured inside the child (no interpreter
    start-up); ``peak_rss_mb`` is the child's own peak RSS (VmHWM, read by
    the child at its end, see proc_mem_mb).  ``ru_maxrss_mb`` is the child's
    ru_maxrss from ``os.wait4``, kept for reference: on Linux it is never
    below this (the caller's) process's RSS when the child was started, so
    it overstates the child when the caller is big; it is the fallback for
    peak_rss_mb where /proc is missing.  Extra keys: preprocessed,
    preprocess_error, calib_batch, child_base_rss_mb (peak RSS after
    imports), wall_seconds (including the child's start-up).
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    calib = np.asarray(calib, dtype=np.float32)
    if calib.ndim != 4 or len(calib) == 0:
        raise ValueError(f"calib must be (N,C,H,W), got {calib.shape}")
    out_path = os.path.abspath(out_path)
    os.makedirs(os.path.dirname(out_path), exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="ortq_") as tmp:
        calib_file = os.path.join(tmp, "calib.npy")
        res_file = os.path.join(tmp, "result.json")
        log_file = os.path.join(tmp, "log.txt")
        np.save(calib_file, calib)
        args = {"src": os.path.abspath(fp32_onnx), "out": out_path, "calib": calib_file,
                "method": method, "input_name": input_name, "batch": batch,
                "extra_options": extra_options}
        t0 = time.perf_counter()
        with open(log_file, "w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-c", _CHILD_CODE, os.path.abspath(__file__),
                 json.dumps(args), res_file],
                stdout=log, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        if proc.returncode != 0 or not os.path.exists(res_file):
            with open(log_file) as f:
                tail = f.read()[-4000:]
            raise RuntimeError(f"quantization child failed (rc={proc.returncode}):\n{tail}")
        with open(res_file) as f:
            info = json.load(f)

    # ru_maxrss is in KiB on Linux
    ru_maxrss_mb = usage.ru_maxrss / 1024.0
    peak = info.pop("child_vm_hwm_mb") or ru_maxrss_mb
    return {"path": out_path, "seconds": info.pop("seconds"), "peak_rss_mb": peak,
            "ru_maxrss_mb": ru_maxrss_mb, "wall_seconds": wall, **info}


# --------------------------------------------------------------------------
# inference
# --------------------------------------------------------------------------


def _session_options(threads: int, spin: bool = True):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if not spin:  # idle pool threads otherwise busy-wait and steal cores from the next session
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return so


def ort_session(path: str, threads: int = 2, spin: bool = True):
    """CPU InferenceSession, intra-op ``threads``, inter-op 1, all graph opts.

    ``spin=False`` stops idle intra-op threads busy-waiting (see ort_latency).
    """
    import onnxruntime as ort

    return ort.InferenceSession(path, sess_options=_session_options(threads, spin),
                                providers=["CPUExecutionProvider"])


def ort_latency(paths: dict[str, str], batch: int, threads: int = 2,
                rounds: int = 7, warmup: int = 2, spin: bool = False) -> dict[str, float]:
    """Median ms per batch for each model, measured interleaved.

    Every round runs each model once (in dict order) so slow drift of a noisy
    machine hits all models alike; ``warmup`` untimed rounds come first.
    Spinning is off by default: with several live sessions, the busy-waiting
    pool threads of the session that just ran steal cores from the next one.
    """
    sessions = {k: ort_session(p, threads, spin) for k, p in paths.items()}
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 3, 224, 224), dtype=np.float32)
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
    times = {k: [] for k in sessions}
    for r in range(warmup + rounds):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feeds[k])
            dt = (time.perf_counter() - t0) * 1e3
            if r >= warmup:
                times[k].append(dt)
    return {k: float(np.median(v)) for k, v in times.items()}


def integer_ops(path: str) -> collections.Counter:
    """Counter of op types in the graph ORT produces after level-ALL optimisation."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="ortopt_") as tmp:
        so = _session_options(1)
        so.log_severity_level = 3  # hide the "hardware specific optimizations" warning
        so.optimized_model_filepath = os.path.join(tmp, "opt.onnx")
        ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])
        model = onnx.load(so.optimized_model_filepath)
    return collections.Counter(n.op_type for n in model.graph.node)


INTEGER_OP_TYPES = ("QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul",
                    "QGemm", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
                    "QLinearAdd", "QLinearGlobalAveragePool", "QLinearMul",
                    "QLinearAveragePool", "QLinearConcat", "QLinearSigmoid",
                    "QLinearLeakyRelu", "QLinearSoftmax")
