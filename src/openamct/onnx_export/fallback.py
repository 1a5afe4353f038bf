"""Never slower than float: which quantized layers the deploy model keeps in float, because ONNX Runtime runs
their INT8 kernel slower than the float one at the shapes the model was exported with.

Decided by measuring, not from a list: each layer is timed in ONNX Runtime both ways, alone, as the deploy model
would run it (_layer_models): its INT8 kernel between the uint8 tensors its neighbours hand over (QuantizeLinear/
DequantizeLinear around it, which ORT fuses into QLinearConv / QGemm), and the float layer. A layer kept float
still reads a quantized input where a layer writes it or an INT8 kernel reads it (so its neighbours stay on
integers), but reads a model input as it is, and its output is not quantized for the ops that follow it (they
fuse with it as in the float model). The times are cached on disk by op, attributes, shapes, thread count and
those forms, so repeated exports are fast.

A layer alone is not the model: keeping a layer float changes what ORT fuses around it (and the layout it runs
in), and a few layers each faster in float alone have made a whole model slower. So the layers faster in float
alone are tried on the whole deploy model, the largest gain first, each kept float only where the whole model
is then the faster (`choose`).
"""
import json
import os
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from ..core import log
from ..core.fileio import write_text
from ..core.primitives import qrange
from .parity import session
from .qdq import _WEIGHT_QUANTIZED_BY_ORT, OPSET, float_input_layers, layer_codes

MARGIN, GAIN = 1.1, 0.05  # one form must be 10% and 0.05 ms faster than the other: timing noise must not decide
ROUNDS, SPAN = 7, 0.1  # timed runs of each form at least, and the seconds it runs for if 50 runs allow
WHOLE_ROUNDS, WHOLE_SPAN = 6, 1.0  # the same for whole models, in interleaved rounds
PATIENCE = 3  # layers in a row that the whole model did not run faster float, after which the rest are not tried
CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "openamct", "kernels.json")


def tensor_shapes(fused: onnx.ModelProto, sample) -> dict:
    """Tensor name -> static shape in the fused model for inputs shaped as `sample` (a tuple of arrays; None: the
    model's own input dims, 1 where dynamic), by ONNX shape inference."""
    model = onnx.ModelProto()
    model.CopyFrom(fused)
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    for index, graph_input in enumerate(inputs):
        dims = graph_input.type.tensor_type.shape.dim
        given = tuple(sample[index].shape) if sample is not None and index < len(sample) else None
        for axis, dim in enumerate(dims):
            size = given[axis] if given else (dim.dim_value or 1)
            dim.Clear()
            dim.dim_value = int(size)
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for info in list(inferred.graph.value_info) + list(inferred.graph.input):
        dims = info.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[info.name] = tuple(d.dim_value for d in dims)
    return shapes


def _layer_models(node: onnx.NodeProto, entry: dict, rec, inits: dict, shape: tuple, model_input: bool) -> dict:
    """The layer alone as the deploy model runs it: {"int8": weights and bias through DequantizeLinear, between
    quantize/dequantize pairs, "float": float weights and bias}. Its input is a uint8 tensor (dequantized), or
    with `model_input` the float model input (quantized first for INT8, read as it is in float); its output is
    quantized for the next layer in both forms where a layer reads it, and otherwise (rec.scale_o: something
    else reads it) dequantized after the INT8 kernel and left as it is in float (build_quantized)."""
    weight = numpy_helper.to_array(inits[node.input[1]])
    bias = numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2 and node.input[2] in inits else None
    scale_w = np.asarray(rec.scale_w, np.float32)
    grid = np.float32(rec.scale_d) * scale_w
    per_channel = {"axis": entry["axis"]} if scale_w.size > 1 else {}
    scale_o, offset_o = (rec.scale_o, rec.offset_o) if rec.scale_o is not None else (rec.scale_d, rec.offset_d)
    qmin = qrange(entry["act_bits"])[0]
    float_output = rec.scale_o is not None
    models = {}
    for form in ("int8", "float"):
        consts = {"x.s": np.float32(rec.scale_d), "x.z": np.uint8(rec.offset_d - qmin),
                  "y.s": np.float32(scale_o), "y.z": np.uint8(offset_o - qmin)}
        nodes, layer_input = [], "x"
        if not (model_input and form == "float"):
            if model_input:  # the INT8 form quantizes the float model input itself
                nodes.append(helper.make_node("QuantizeLinear", ["x", "x.s", "x.z"], ["x.q"]))
            nodes.append(helper.make_node("DequantizeLinear", [nodes[-1].output[0] if nodes else "x", "x.s", "x.z"],
                                          ["x.dq"]))
            layer_input = "x.dq"
            if form == "float" and node.op_type in _WEIGHT_QUANTIZED_BY_ORT:  # as build_quantized: stays float
                consts.update({"x.s": np.full(shape[1], rec.scale_d, np.float32),
                               "x.z": np.full(shape[1], rec.offset_d - qmin, np.uint8)})
                nodes[-1].attribute.append(helper.make_attribute("axis", 1))
        if form == "int8":
            consts.update({"w.q": layer_codes(entry, rec, weight).astype(np.int8), "w.s": scale_w.squeeze(),
                           "w.z": np.zeros(scale_w.shape, np.int8).squeeze()})
            nodes.append(helper.make_node("DequantizeLinear", ["w.q", "w.s", "w.z"], ["w"], **per_channel))
            if bias is not None:
                consts.update({"b.q": np.round(bias / grid).astype(np.int32), "b.s": grid.squeeze(),
                               "b.z": np.zeros(grid.shape, np.int32).squeeze()})
                nodes.append(helper.make_node("DequantizeLinear", ["b.q", "b.s", "b.z"], ["b"],
                                              **({"axis": 0} if scale_w.size > 1 else {})))
        else:
            consts["w"] = weight
            if bias is not None:
                consts["b"] = bias
        layer = helper.make_node(node.op_type, [layer_input, "w"] + (["b"] if bias is not None else []), ["y.f"])
        layer.attribute.extend(node.attribute)
        nodes.append(layer)
        if float_output and form == "float":
            nodes.append(helper.make_node("Identity", ["y.f"], ["y"]))
        elif float_output:
            nodes += [helper.make_node("QuantizeLinear", ["y.f", "y.s", "y.z"], ["y.q"]),
                      helper.make_node("DequantizeLinear", ["y.q", "y.s", "y.z"], ["y"])]
        else:
            nodes.append(helper.make_node("QuantizeLinear", ["y.f", "y.s", "y.z"], ["y"]))
        types = [onnx.TensorProto.FLOAT if flag else onnx.TensorProto.UINT8 for flag in (model_input, float_output)]
        graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", types[0], shape)],
                                  [helper.make_tensor_value_info("y", types[1], None)],
                                  [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()])
        models[form] = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    return models


def _fastest(model: onnx.ModelProto, feed, threads: int) -> float:
    """The model's fastest run in ms: ROUNDS runs at least, more for a fast model, until it has run for SPAN
    seconds (other processes on the cores slow single runs down, never speed them up). `feed`: a dict of inputs,
    or a list of arrays in the graph's input order."""
    sess = session(model, threads)
    if not isinstance(feed, dict):
        feed = _feed(sess, feed)
    sess.run(None, feed)  # warm-up
    times = []
    while len(times) < ROUNDS or (sum(times) < SPAN and len(times) < 50):
        start = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def _feed(sess, arrays) -> dict:
    """The session's inputs from `arrays` (in the graph's input order). Where the graph has a static batch size
    (exported without dynamic axes) other than the arrays', the arrays are cut or repeated to it."""
    feed = {}
    for graph_input, array in zip(sess.get_inputs(), arrays):
        array = np.asarray(array)
        batch = graph_input.shape[0] if graph_input.shape else None
        if isinstance(batch, int) and array.ndim and batch != array.shape[0]:
            array = np.resize(array, (batch,) + array.shape[1:])
        feed[graph_input.name] = array
    return feed


def _time(models: dict, shape: tuple, threads: int, model_input: bool) -> dict:
    """Fastest run of each form of a layer, in ms (_fastest). One form after the other, not interleaved: the idle
    threads of one session spin for a while and would slow the other down."""
    rng = np.random.default_rng(0)
    feed = {"x": rng.standard_normal(shape, dtype=np.float32) if model_input else
            rng.integers(0, 256, shape, dtype=np.uint8)}
    return {form: _fastest(model, feed, threads) for form, model in models.items()}


def whole_model_times(models: dict, sample, threads: int = 0) -> dict:
    """Name -> median ms of each whole model of `models` (name -> ModelProto) on `sample` (a list of arrays, the
    graph's inputs in order), over interleaved rounds, each running every model once (idle threads not spinning),
    so that a slow spell of the machine, which here lasts from seconds to minutes and changes a model's time by a
    quarter, falls on all of them alike: WHOLE_ROUNDS rounds at least, more until WHOLE_SPAN seconds if 50 allow."""
    sessions = {name: session(model, threads, spin=False) for name, model in models.items()}
    feeds = {name: _feed(sess, sample) for name, sess in sessions.items()}
    for name, sess in sessions.items():
        sess.run(None, feeds[name])  # warm-up
    times, rounds, started = {name: [] for name in sessions}, 0, time.perf_counter()
    while rounds < WHOLE_ROUNDS or (time.perf_counter() - started < WHOLE_SPAN and rounds < 50):
        rounds += 1
        for name, sess in sessions.items():
            start = time.perf_counter()
            sess.run(None, feeds[name])
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * float(np.median(runs)) for name, runs in times.items()}


def _key(node: onnx.NodeProto, inits: dict, shape: tuple, threads: int, forms: tuple) -> str:
    attributes = sorted((a.name, str(helper.get_attribute_value(a))) for a in node.attribute)
    weight = tuple(inits[node.input[1]].dims)
    bias = len(node.input) > 2 and node.input[2] in inits
    return json.dumps([ort.__version__, node.op_type, attributes, shape, weight, bias, threads or os.cpu_count(),
                       forms])


def _read_cache() -> dict:
    try:
        with open(CACHE) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def slower(ms: float, than: float) -> bool:
    """`ms` slower than `than` by MARGIN and GAIN."""
    return ms > max(MARGIN * than, than + GAIN)


def float_layers(fused: onnx.ModelProto, mapping: dict, records: dict, sample, threads: int = 0) -> dict:
    """Layer -> why it is deployed in float: those whose INT8 form ONNX Runtime runs slower than its float form,
    by MARGIN and GAIN, on the shapes of `sample` (see the module docstring), the largest difference first."""
    inits = {i.name: i for i in fused.graph.initializer}
    nodes = {n.name: n for n in fused.graph.node}
    shapes = tensor_shapes(fused, sample)
    cache, changed = _read_cache(), False
    reasons, gains = {}, {}
    for layer, entry in mapping.items():
        node = nodes[entry["node"]]
        shape = shapes.get(node.input[0])
        if layer not in records or shape is None or node.input[1] not in inits or records[layer].nuq_levels:
            continue  # a NUQ layer stays on its codebook: its packed weights are what it was quantized for
        model_input = bool(float_input_layers(fused, mapping, {layer}))
        key = _key(node, inits, shape, threads, (model_input, records[layer].scale_o is not None))
        if key not in cache:
            models = _layer_models(node, entry, records[layer], inits, shape, model_input)
            cache[key] = _time(models, shape, threads, model_input)
            # confirmed by a second timing before it is kept: a busy core misleads one
            if slower(cache[key]["int8"], cache[key]["float"]):
                again = _time(models, shape, threads, model_input)
                cache[key] = {form: min(cache[key][form], again[form]) for form in again}
            changed = True
        times = cache[key]
        if slower(times["int8"], times["float"]):
            gains[layer] = times["int8"] - times["float"]
            reasons[layer] = (f"ONNX Runtime runs its INT8 kernel slower than float on input {list(shape)}: "
                              f"{times['int8']:.3g} ms against {times['float']:.3g} ms")
    if changed:
        try:
            write_text(CACHE, json.dumps(cache))  # atomically: exports running side by side share the file
        except OSError as err:
            log.warning(f"Kernel timings not cached ({err}).", "Coverage")
    return {layer: reasons[layer] for layer in sorted(reasons, key=gains.get, reverse=True)}


def choose(build, candidates: list, sample) -> dict:
    """Layer -> (the whole deploy model's ms with it float, without it), or None where it was not tried: each of
    `candidates` (the largest gain alone first) in turn, on top of those kept before it, timed with
    `build(layers)` -> the deploy model with `layers` float (whole_model_times), and kept float where that model is
    the faster by MARGIN and GAIN. After PATIENCE candidates in a row that were not, the rest (smaller gains
    alone) are not tried: on a large model each trial takes seconds. The kept are those whose first time is the
    lower (`slower`)."""
    kept, decisions, misses = [], {}, 0
    current = build(kept)
    for layer in candidates:
        if misses >= PATIENCE:
            decisions[layer] = None
            continue
        trial = build(kept + [layer])
        times = whole_model_times({"with": trial, "without": current}, sample)
        decisions[layer] = (times["with"], times["without"])
        if slower(times["without"], times["with"]):
            kept.append(layer)
            current, misses = trial, 0
        else:
            misses += 1
    return decisions
