"""Never slower than float: which quantized layers the deploy model keeps in float, because ONNX Runtime runs
their INT8 kernel slower than the float one at the shapes the model was exported with.

Decided by measuring, not from a list: each layer is timed in ONNX Runtime both ways, alone, between the INT8
tensors its neighbours hand over (uint8 in, uint8 out): as QuantizeLinear/DequantizeLinear around it, which ORT
fuses into QLinearConv / QGemm, and as DequantizeLinear -> the float layer -> QuantizeLinear, which is what the
deploy model runs when the layer stays float (its input and output stay quantized, so its neighbours stay on
integers). The times are cached on disk by op, attributes, shapes and thread count, so repeated exports are fast.

A layer alone is not the model: keeping a layer float changes what ORT fuses around it, and a few layers each
faster in float alone have made a whole model slower. So where any layer is to stay float, the whole deploy model
is timed with those layers float and with none (`whole_model_times`), and the layers stay float only where that
model is the faster.
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
from .qdq import _WEIGHT_QUANTIZED_BY_ORT, OPSET, layer_codes

MARGIN, GAIN = 1.1, 0.05  # one form must be 10% and 0.05 ms faster than the other: timing noise must not decide
ROUNDS, SPAN = 7, 0.1  # timed runs of each form at least, and the seconds it runs for if 50 runs allow
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


def _layer_models(node: onnx.NodeProto, entry: dict, rec, inits: dict, shape: tuple) -> dict:
    """The layer alone between uint8 tensors: {"int8": weights and bias through DequantizeLinear, "float": float
    weights and bias}, both reading and writing quantized activations."""
    weight = numpy_helper.to_array(inits[node.input[1]])
    bias = numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2 and node.input[2] in inits else None
    scale_w = np.asarray(rec.scale_w, np.float32)
    grid = np.float32(rec.scale_d) * scale_w
    per_channel = {"axis": entry["axis"]} if scale_w.size > 1 else {}
    scale_o, offset_o = (rec.scale_o, rec.offset_o) if rec.scale_o is not None else (rec.scale_d, rec.offset_d)
    qmin = qrange(entry["act_bits"])[0]
    models = {}
    for form in ("int8", "float"):
        consts = {"x.s": np.float32(rec.scale_d), "x.z": np.uint8(rec.offset_d - qmin),
                  "y.s": np.float32(scale_o), "y.z": np.uint8(offset_o - qmin)}
        nodes = [helper.make_node("DequantizeLinear", ["x", "x.s", "x.z"], ["x.dq"])]
        if form == "float" and node.op_type in _WEIGHT_QUANTIZED_BY_ORT:  # as qdq.build_quantized: stays float
            consts.update({"x.s": np.full(shape[1], rec.scale_d, np.float32),
                           "x.z": np.full(shape[1], rec.offset_d - qmin, np.uint8)})
            nodes[0].attribute.append(helper.make_attribute("axis", 1))
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
        layer = helper.make_node(node.op_type, ["x.dq", "w"] + (["b"] if bias is not None else []), ["y.f"])
        layer.attribute.extend(node.attribute)
        nodes += [layer, helper.make_node("QuantizeLinear", ["y.f", "y.s", "y.z"], ["y"])]
        graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", onnx.TensorProto.UINT8, shape)],
                                  [helper.make_tensor_value_info("y", onnx.TensorProto.UINT8, None)],
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


def _time(models: dict, shape: tuple, threads: int) -> dict:
    """Fastest run of each form of a layer, in ms (_fastest). One form after the other, not interleaved: the idle
    threads of one session spin for a while and would slow the other down."""
    feed = {"x": np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)}
    return {form: _fastest(model, feed, threads) for form, model in models.items()}


def whole_model_times(models: dict, sample, threads: int = 0) -> dict:
    """Name -> fastest run in ms (_fastest) of each whole model of `models` (name -> ModelProto) on `sample` (a list
    of arrays, the graph's inputs in order): the models in turn, twice round, so that a slow minute of the machine
    slows each of them."""
    best = {}
    for _ in range(2):
        for name, model in models.items():
            best[name] = min(best.get(name, np.inf), _fastest(model, sample, threads))
    return best


def _key(node: onnx.NodeProto, inits: dict, shape: tuple, threads: int) -> str:
    attributes = sorted((a.name, str(helper.get_attribute_value(a))) for a in node.attribute)
    weight = tuple(inits[node.input[1]].dims)
    bias = len(node.input) > 2 and node.input[2] in inits
    return json.dumps([ort.__version__, node.op_type, attributes, shape, weight, bias, threads or os.cpu_count()])


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
    by MARGIN and GAIN, on the shapes of `sample` (see the module docstring)."""
    inits = {i.name: i for i in fused.graph.initializer}
    nodes = {n.name: n for n in fused.graph.node}
    shapes = tensor_shapes(fused, sample)
    cache, changed = _read_cache(), False
    reasons = {}
    for layer, entry in mapping.items():
        node = nodes[entry["node"]]
        shape = shapes.get(node.input[0])
        if layer not in records or shape is None or node.input[1] not in inits or records[layer].nuq_levels:
            continue  # a NUQ layer stays on its codebook: its packed weights are what it was quantized for
        key = _key(node, inits, shape, threads)
        if key not in cache:
            models = _layer_models(node, entry, records[layer], inits, shape)
            cache[key] = _time(models, shape, threads)
            # confirmed by a second timing before it is kept: a busy core misleads one
            if slower(cache[key]["int8"], cache[key]["float"]):
                again = _time(models, shape, threads)
                cache[key] = {form: min(cache[key][form], again[form]) for form in again}
            changed = True
        times = cache[key]
        if slower(times["int8"], times["float"]):
            reasons[layer] = (f"ONNX Runtime runs its INT8 kernel slower than float on input {list(shape)}: "
                              f"{times['int8']:.3g} ms against {times['float']:.3g} ms")
    if changed:
        try:
            write_text(CACHE, json.dumps(cache))  # atomically: exports running side by side share the file
        except OSError as err:
            log.warning(f"Kernel timings not cached ({err}).", "Coverage")
    return reasons
