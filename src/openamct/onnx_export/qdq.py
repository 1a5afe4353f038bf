"""The deploy (INT8 QDQ) and fake-quant models, built from the fused float model and the layers' records.

Deploy: QuantizeLinear/DequantizeLinear with uint8 activations, int8 weights and int32 biases, the pattern ONNX
Runtime turns into QLinearConv / QGemm / MatMulInteger kernels. Fake-quant (AMCT's form, standard ops only):
Div/Round/Add/Clip/Sub give integer codes, each layer runs on integer-valued weights and bias, and one division by 1
/ (scale_d * scale_w) dequantizes its output; where that output (through ReLU/Clip) is quantized again, the codes
come from the accumulator in one Mul, as QLinearConv requantizes. This is the arithmetic of the PyTorch simulation,
step for step, so the two agree bit for bit.
"""
import heapq
from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..core.algorithms import nuq
from ..core.primitives import qrange, range_implies_clip

OPSET = 17


def _channel_shape(array: np.ndarray, axis: int, n: int) -> tuple:
    shape = [1] * array.ndim
    shape[axis] = n
    return tuple(shape)


def weight_codes(weight: np.ndarray, scale_w: np.ndarray, axis: int, num_bits: int, levels=None) -> np.ndarray:
    """INT8 codes of a weight, computed exactly as the PyTorch simulation does (float32 divide, half-to-even),
    snapped to the NUQ codebook(s) `levels` when given."""
    qmin, qmax = qrange(num_bits)
    scale = scale_w.reshape(_channel_shape(weight, axis, scale_w.size)) if scale_w.size > 1 else scale_w.reshape(())
    codes = np.clip(np.round(weight.astype(np.float32) / scale.astype(np.float32)), qmin, qmax)
    return codes if levels is None else nuq.snap(codes, levels)


def layer_codes(entry: dict, rec, weight: np.ndarray) -> np.ndarray:
    levels = np.asarray(rec.nuq_levels).reshape(-1, entry["num_steps"]) if len(rec.nuq_levels) else None
    return weight_codes(weight, np.asarray(rec.scale_w, dtype=np.float32), entry["axis"], entry["weight_bits"],
                        levels)


def _toposort(graph: onnx.GraphProto, nodes: list) -> None:
    """Replace graph.node by `nodes` in an order where every input is produced before it is used (Kahn's algorithm,
    the earliest-listed ready node first, so an already sorted list is kept as it is)."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    producer = {output: index for index, node in enumerate(nodes) for output in node.output}
    waiting = [0] * len(nodes)  # inputs each node still waits for
    users = defaultdict(list)
    for index, node in enumerate(nodes):
        for name in set(node.input) - available:
            if name not in producer:
                raise RuntimeError(f"graph has an undefined input: {name} of {node.name}")
            waiting[index] += 1
            users[producer[name]].append(index)
    ready = [index for index, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    ordered = []
    while ready:
        index = heapq.heappop(ready)
        ordered.append(nodes[index])
        for user in users[index]:
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, user)
    if len(ordered) < len(nodes):
        raise RuntimeError("graph has a cycle: " + next(n.name for i, n in enumerate(nodes) if waiting[i]))
    del graph.node[:]
    graph.node.extend(ordered)


def _quant_nodes(tensor: str, tag: str, scale: float, offset: int, num_bits: int, deploy: bool, const,
                 requantize=None) -> list:
    """Nodes that quantize `tensor` and give its dequantized value as `<tag>.dq`.

    Deploy: QuantizeLinear/DequantizeLinear with uint8 codes (AMCT's int8 code + 128: the same numbers, and the
    kernels x86 runs fastest). Fake-quant: AMCT's Div/Round/Add/Clip/Sub chain, then Mul back to float; where
    `requantize` = (accumulator tensor, grid) names the integer accumulator `tensor` was computed from, the chain
    starts from it with one Mul by grid / scale instead of the Div, as the simulation (modules.requantize) does.
    """
    qmin, qmax = qrange(num_bits)
    s = const(f"{tag}.scale", np.float32(scale))
    if deploy:
        zp = const(f"{tag}.zero_point", np.uint8(offset - qmin))
        return [helper.make_node("QuantizeLinear", [tensor, s, zp], [f"{tag}.q"], name=tag),
                helper.make_node("DequantizeLinear", [f"{tag}.q", s, zp], [f"{tag}.dq"], name=f"{tag}.dq")]
    off = const(f"{tag}.offset", np.float32(offset))
    lo, hi = const(f"{tag}.min", np.float32(qmin)), const(f"{tag}.max", np.float32(qmax))
    if requantize is None:
        first = ("Div", [tensor, s])
    else:
        acc, grid = requantize
        first = ("Mul", [acc, const(f"{tag}.multiplier", (grid / np.float32(scale)).astype(np.float32))])
    steps = [first, ("Round", []), ("Add", [off]), ("Clip", [lo, hi]), ("Sub", [off]), ("Mul", [s])]
    names = {"Sub": f"{tag}.codes"}  # codes feed the quantized layers, the dequantized value everything else
    chain, prev = [], None
    for i, (op, extra) in enumerate(steps):
        out = f"{tag}.dq" if i == len(steps) - 1 else names.get(op, f"{tag}.{op.lower()}")
        chain.append(helper.make_node(op, extra if prev is None else [prev] + extra, [out], name=out))
        prev = out
    return chain


def _clipped_source(tensor: str, producers: dict, inits: dict, accumulators: dict):
    """(accumulator, grid, low, high) when `tensor` is a quantized layer's output passed through Relu/Clip nodes
    with constant bounds (initializers) only, else None: the pattern the simulation requantizes in one step."""
    low, high = -np.inf, np.inf
    node = producers.get(tensor)
    while node is not None and node.op_type in ("Relu", "Clip"):
        bounds = [0.0, np.inf] if node.op_type == "Relu" else [-np.inf, np.inf]
        for i in (1, 2):
            if node.op_type == "Clip" and len(node.input) > i and node.input[i]:
                if node.input[i] not in inits:
                    return None
                bounds[i - 1] = float(numpy_helper.to_array(inits[node.input[i]]))
        low, high = max(low, bounds[0]), min(high, bounds[1])
        node = producers.get(node.input[0])
    if node is None or node.output[0] not in accumulators:
        return None
    return accumulators[node.output[0]] + (low, high)


_WEIGHT_QUANTIZED_BY_ORT = ("Conv", "ConvTranspose", "Gemm")


def _input_channels(node: onnx.NodeProto, weight: np.ndarray) -> int:
    """The channels (dim 1) of a Conv / ConvTranspose / Gemm node's input."""
    if node.op_type == "Conv":
        return weight.shape[1] * next((a.i for a in node.attribute if a.name == "group"), 1)
    if node.op_type == "Gemm":
        return weight.shape[1 if next((a.i for a in node.attribute if a.name == "transB"), 0) else 0]
    return weight.shape[0]


def bias_add(node: onnx.NodeProto, readers: dict, inits: dict):
    """(the Add node, the index of the bias among its inputs) where the exporter wrote a MatMul layer's bias as an
    Add of a constant after it (a Linear on more than two dims): a 1-D constant, one value per output feature
    (a positional embedding added after a Linear is not 1-D), else None."""
    if node.op_type != "MatMul" or len(readers[node.output[0]]) != 1 or node.input[1] not in inits:
        return None
    add = readers[node.output[0]][0]
    features = inits[node.input[1]].dims[-1]
    index = next((i for i, name in enumerate(add.input) if name in inits and list(inits[name].dims) == [features]),
                 None)
    return (add, index) if add.op_type == "Add" and index is not None else None


def output_site(node: onnx.NodeProto, readers: dict, inits: dict) -> str:
    """The tensor a layer's output quantizer reads (core/capture.output_site): the layer's output (after the
    bias Add that the exporter writes after a MatMul), followed through the Relu/Clip nodes that are its only
    reader (`readers`: tensor -> the nodes that read it), which ONNX Runtime fuses into the integer kernel."""
    tensor = node.output[0]
    bias = bias_add(node, readers, inits)
    if bias is not None:
        tensor = bias[0].output[0]
    while len(readers[tensor]) == 1 and readers[tensor][0].op_type in ("Relu", "Clip") and \
            all(name in inits for name in readers[tensor][0].input[1:] if name):
        tensor = readers[tensor][0].output[0]
    return tensor


def float_input_layers(fused: onnx.ModelProto, mapping: dict, float_layers) -> set:
    """The layers of `float_layers` that read a model input which only such layers read: deployed in float, they
    read it unquantized (QuantLayer.float_input), since no integer kernel needs it quantized."""
    graph = fused.graph
    inputs = {i.name for i in graph.input} - {i.name for i in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    float_nodes = {mapping[layer]["node"] for layer in float_layers}
    readers = defaultdict(set)
    for node in graph.node:
        for name in node.input:
            readers[name].add(node.name)
    return {layer for layer in float_layers if nodes[mapping[layer]["node"]].input[0] in inputs
            and readers[nodes[mapping[layer]["node"]].input[0]] <= float_nodes}


def build_quantized(fused: onnx.ModelProto, mapping: dict, records: dict, deploy: bool,
                    float_layers=()) -> onnx.ModelProto:
    """The deploy (deploy=True) or fake-quant model for the fused model (left unchanged) and its record.

    Each quantized tensor gets one quantize/dequantize chain and *all* its consumers read the dequantized value
    (as in the PyTorch simulation), so e.g. a residual add sees integers on both inputs. The layers in
    `float_layers` run in float (fallback.py): their output is not quantized (what follows fuses with them, as in
    the float model), their input is where another INT8 kernel writes or reads it, or where it comes from a
    layer (so that layer stays on integers), and is not where only such float layers read a model input
    (float_input_layers).
    """
    model = onnx.ModelProto()
    model.CopyFrom(fused)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    added_nodes, new_inits, tensors, integer_inputs = [], [], {}, set()
    accumulators = {}  # fake-quant: a layer's output -> (its accumulator tensor, grid shaped for it)
    float_inputs = []  # deploy: (layer, node, input tensor, its channels) of the layers kept float
    readers = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            readers[name].append(node)

    def const(name, array):
        new_inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    float_read = float_input_layers(fused, mapping, float_layers)
    for layer, entry in mapping.items():
        if layer not in records:
            continue
        rec, node = records[layer], nodes[entry["node"]]
        weight = numpy_helper.to_array(inits[entry["weight"]])
        if rec.tensor_balance_factor:  # DMQ: the layer reads its input times 1/s, as QuantLayer.balance_input
            inverse = (1 / np.asarray(rec.tensor_balance_factor, np.float64)).astype(np.float32)
            shape = (inverse.size,) + (1,) * (weight.ndim - 2)
            graph.node.append(helper.make_node("Mul", [node.input[0], const(f"{layer}.balance_inverse",
                                                                            inverse.reshape(shape))],
                                               [f"{layer}.balanced"], name=f"{layer}.balance"))
            node.input[0] = f"{layer}.balanced"
        if layer not in float_read:
            tensors.setdefault(node.input[0], (f"{layer}.quant", rec.scale_d, rec.offset_d, entry["act_bits"]))
        if rec.scale_o is not None and layer not in float_layers:
            tensors.setdefault(output_site(node, readers, inits),
                               (f"{layer}.quant_out", rec.scale_o, rec.offset_o, entry["act_bits"]))
        if layer in float_layers:
            if deploy and node.op_type in _WEIGHT_QUANTIZED_BY_ORT and layer not in float_read:
                float_inputs.append((layer, node, node.input[0], _input_channels(node, weight)))
            continue

        scale_d = np.float32(rec.scale_d)
        scale_w = np.asarray(rec.scale_w, dtype=np.float32)
        codes = layer_codes(entry, rec, weight)
        per_channel = scale_w.size > 1
        grid = (scale_d * scale_w).astype(np.float32)  # the accumulator's scale, as the simulation computes it
        added_bias = bias_add(node, readers, inits)
        bias_name = node.input[2] if len(node.input) > 2 and node.input[2] in inits else \
            added_bias[0].input[added_bias[1]] if added_bias else None
        bias = numpy_helper.to_array(inits[bias_name]).astype(np.float32) if bias_name else None
        bias_codes = np.round(bias / grid) if bias_name else None
        if bias_name and np.abs(bias_codes).max() > 2 ** 31 - 1:
            raise OverflowError(f"layer '{layer}': bias does not fit in INT32")
        if deploy:
            axis = {"axis": entry["axis"]} if per_channel else {}
            wq = const(f"{layer}.weight_quant", codes.astype(np.int8))
            ws = const(f"{layer}.weight_scale", scale_w if per_channel else scale_w[0])
            wz = const(f"{layer}.weight_zero_point", np.zeros(scale_w.shape, np.int8) if per_channel else np.int8(0))
            added_nodes.append(helper.make_node("DequantizeLinear", [wq, ws, wz], [f"{layer}.weight_dq"],
                                                name=f"{layer}.weight_dq", **axis))
            node.input[1] = f"{layer}.weight_dq"
            if added_bias:  # the bias as the simulation adds it: its INT32 codes on the grid, here in float
                added_bias[0].input[added_bias[1]] = const(f"{layer}.bias_on_grid", (bias_codes * grid).astype(
                    np.float32))
            elif bias_name:
                b = const(f"{layer}.bias_quant", bias_codes.astype(np.int32))
                bs = const(f"{layer}.bias_scale", grid if per_channel else grid[0])
                bz = const(f"{layer}.bias_zero_point", np.zeros(grid.shape, np.int32) if per_channel else np.int32(0))
                added_nodes.append(helper.make_node("DequantizeLinear", [b, bs, bz], [f"{layer}.bias_dq"],
                                                    name=f"{layer}.bias_dq", **({"axis": 0} if per_channel else {})))
                node.input[2] = f"{layer}.bias_dq"
        else:  # AMCT's form: the layer on integer codes, then the accumulator scale, as the simulation does.
            # A Div by 1 / (scale_d * scale_w), not a Mul: ONNX Runtime folds a constant Mul after a Conv into its
            # weights (ConvMulFusion), which takes the conv off the integers; a Div it leaves alone, so this model
            # reproduces the simulation bit for bit.
            node.input[1] = const(f"{layer}.weight_fakequant", codes.astype(np.float32))
            if bias_name and not added_bias:
                node.input[2] = const(f"{layer}.bias_fakequant", bias_codes.astype(np.float32))
            rank = weight.ndim if node.op_type in ("Conv", "ConvTranspose") else 1
            shape = [1] * rank
            if per_channel:
                shape[1 if rank > 1 else 0] = grid.size
            output = node.output[0]
            node.output[0] = f"{layer}.acc"
            if added_bias:  # the bias codes join the accumulator before the scale, as in the simulation
                add = added_bias[0]
                output, add.output[0] = add.output[0], f"{layer}.acc"
                node.output[0] = f"{layer}.product"
                add.input[:] = [f"{layer}.product", const(f"{layer}.bias_fakequant", bias_codes.astype(np.float32))]
            inverse = (np.float32(1) / grid).astype(np.float32).reshape(shape)
            added_nodes.append(helper.make_node("Div", [f"{layer}.acc", const(f"{layer}.dequant", inverse)],
                                                [output], name=f"{layer}.dequant"))
            integer_inputs.add(node.name)
            accumulators[output] = (f"{layer}.acc", grid.reshape(shape))

    producers = {o: n for n in list(graph.node) + added_nodes for o in n.output}
    for tensor, (tag, scale, offset, bits) in tensors.items():
        requantize = None
        source = None if deploy else _clipped_source(tensor, producers, inits, accumulators)
        # the quantizer's range must imply the clipping, as in modules.requantize
        if source is not None and range_implies_clip(scale, offset, bits, source[2], source[3]):
            requantize = source[:2]
        for node in graph.node:
            node.input[:] = [f"{tag}.dq" if name == tensor else name for name in node.input]
            if node.name in integer_inputs and node.input[0] == f"{tag}.dq":
                node.input[0] = f"{tag}.codes"
        added_nodes.extend(_quant_nodes(tensor, tag, scale, offset, bits, deploy, const, requantize))
    for layer, node, tensor, channels in float_inputs:
        # ORT quantizes the float weight of a Conv/Gemm that reads a per-tensor DequantizeLinear
        # (WeightBiasQuantization); the same dequantization written per channel keeps the layer float
        tag, scale, offset, bits = tensors[tensor]
        zero = np.full(channels, offset - qrange(bits)[0], np.uint8)
        added_nodes.append(helper.make_node("DequantizeLinear", [f"{tag}.q", const(f"{layer}.float_scale", np.full(
            channels, scale, np.float32)), const(f"{layer}.float_zero_point", zero)], [f"{layer}.float_input"],
                                            name=f"{layer}.float_input", axis=1))
        node.input[0] = f"{layer}.float_input"

    nodes = list(graph.node) + added_nodes  # a clip left unread by the requantization stays, for parity probes
    used = {name for node in nodes for name in node.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    _toposort(graph, nodes)
    del model.metadata_props[:]
    model.producer_name = "openamct"
    onnx.checker.check_model(model)
    return model
