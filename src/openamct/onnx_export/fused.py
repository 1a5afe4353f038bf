"""The fused float model: the calibration model with BN folded and every QuantLayer back to its float layer,
exported to ONNX with its shape arithmetic folded and a layer -> node map in its metadata (`openamct.layers`), so
the deploy and fake-quant models can be built from it and the records alone (AMCT's save_model takes the two
files)."""
import copy
import hashlib
import io
import json
import warnings

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

from ..core.layer import QuantLayer
from .qdq import OPSET

META_KEY = "openamct.layers"


def _digest(array: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def float_copy(qmodel: torch.nn.Module) -> torch.nn.Module:
    """The calibration model with every QuantLayer replaced by its (BN-folded) float layer, and without the
    root hooks of the calibration model (copies of them would act as if the copy were the calibration model)."""
    model = copy.deepcopy(qmodel)
    for hooks in ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                  "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
        getattr(model, hooks).clear()
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLayer):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.layer)
    return model


UNKNOWN = -(2 ** 62)  # a dim not fixed at export (the batch axis); no real dim or index is this


def _run_node(node: onnx.NodeProto, values: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The outputs of one node on known input values (ONNX's reference evaluator: the op's own semantics)."""
    inputs = [helper.make_tensor_value_info(i, helper.np_dtype_to_tensor_dtype(values[i].dtype), None)
              for i in node.input if i]
    outputs = [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output]
    single = helper.make_model(helper.make_graph([node], "fold", inputs, outputs),
                               opset_imports=[helper.make_opsetid("", OPSET)])
    return [np.asarray(v) for v in ReferenceEvaluator(single).run(None, {i: values[i] for i in node.input if i})]


def _inputs(node: onnx.NodeProto) -> set[str]:
    """The names a node reads, those its subgraphs (If/Loop bodies) read from the outer scope included."""
    names = set(node.input)
    for attr in node.attribute:
        for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
            names.update(name for inner in sub.node for name in _inputs(inner))
    return names


def _fold_constants(graph: onnx.GraphProto) -> None:
    """Evaluate every node whose inputs are all constants (e.g. the pad arithmetic of TF 'same' padding) into
    initializers: shape arithmetic left in the graph blocks QDQ fusion and costs time at each inference."""
    known = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    kept = []
    for node in graph.node:
        if node.op_type.startswith("Random") or not all(i in known or i == "" for i in node.input):
            kept.append(node)
            continue
        known.update(zip(node.output, _run_node(node, known)))
    graph_outputs = {o.name for o in graph.output}
    used = {i for node in kept for i in _inputs(node)} | graph_outputs
    initial = {i.name for i in graph.initializer}
    for name, value in known.items():
        if name in used and name not in initial:
            graph.initializer.append(numpy_helper.from_array(value, name))
    del graph.node[:]
    graph.node.extend(kept)


def _static_dims(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Tensor name -> its dims, UNKNOWN where a dim is symbolic. ONNX Runtime's symbolic shape inference
    (sympy) knows that x.reshape(x.shape[0], c, -1) keeps the -1 static, where ONNX's own gives up; a graph it
    refuses gets ONNX's."""
    try:
        inferred = SymbolicShapeInference.infer_shapes(model)
    except Exception:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    dims = {}
    for info in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        tensor = info.type.tensor_type
        if tensor.HasField("shape"):
            dims[info.name] = np.array([d.dim_value if d.HasField("dim_value") else UNKNOWN
                                        for d in tensor.shape.dim], dtype=np.int64)
    return dims


def _fold_shapes(model: onnx.ModelProto) -> None:
    """Fold every shape computation that is constant once the exported input dims are fixed: a Shape whose dims
    are all static, or a Gather/Slice of a Shape that picks only static dims (x.shape[2] under a dynamic batch),
    becomes a constant and constant folding finishes the arithmetic behind it; repeated, since a folded Pad
    makes the next layer's shape static. Whatever Python computed the shape (TF 'same' padding from x.shape),
    the convs then see constant pads, and a dim left symbolic at export (the batch) keeps its arithmetic."""
    graph = model.graph
    while True:
        _fold_constants(graph)
        dims, known = _static_dims(model), {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        shapes = {}
        for node in graph.node:
            if node.op_type == "Shape" and node.input[0] in dims:
                attrs = {a.name: a.i for a in node.attribute}
                shapes[node.output[0]] = dims[node.input[0]][attrs.get("start", 0):attrs.get("end")]
        folded = {}
        for node in graph.node:
            if node.op_type in ("Gather", "Slice") and node.input[0] in shapes \
                    and all(i in known or i == "" for i in node.input[1:]):
                folded[node.output[0]] = _run_node(node, {**known, node.input[0]: shapes[node.input[0]]})[0]
        folded.update(shapes)
        folded = {name: value for name, value in folded.items() if np.all(value != UNKNOWN)}
        if not folded:
            break
        graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in folded.items())
        kept = [n for n in graph.node if not set(n.output) <= set(folded)]
        del graph.node[:]
        graph.node.extend(kept)


def _drop_unused(graph: onnx.GraphProto) -> None:
    """Remove the nodes and initializers no graph output depends on (the Shape nodes whose users were folded,
    the pads of the Pads merged into convs)."""
    used = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if used & set(node.output):
            kept.append(node)
            used.update(_inputs(node))
    del graph.node[:]
    graph.node.extend(reversed(kept))
    inits = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def _fold_pads(graph: onnx.GraphProto) -> None:
    """Fold constant zero Pad nodes into the following Conv's pads (TF 'same' padding), so QDQ sits next to Conv."""
    inits = {i.name: i for i in graph.initializer}
    consts = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def value(name):
        if name in inits:
            return numpy_helper.to_array(inits[name])
        if name in consts:
            return numpy_helper.to_array(consts[name].attribute[0].t)
        return None

    for pad in [n for n in graph.node if n.op_type == "Pad"]:
        users = consumers.get(pad.output[0], [])
        mode = next((a.s for a in pad.attribute if a.name == "mode"), b"constant")
        pads = value(pad.input[1]) if len(pad.input) > 1 else None
        fill = value(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else np.zeros(1)
        if len(users) != 1 or users[0].op_type != "Conv" or mode != b"constant" or pads is None or fill is None \
                or np.any(fill != 0) or (len(pad.input) > 3 and pad.input[3]):
            continue
        conv = users[0]
        rank = len(pads) // 2
        if np.any(pads[:2] != 0) or np.any(pads[rank:rank + 2] != 0) or np.any(pads < 0):
            continue
        attr = next((a for a in conv.attribute if a.name == "pads"), None)
        spatial = rank - 2
        old = list(attr.ints) if attr is not None else [0] * (2 * spatial)
        new = [int(a) for a in pads[2:rank]] + [int(a) for a in pads[rank + 2:]]
        merged = [o + n for o, n in zip(old, new)]
        if attr is not None:
            conv.attribute.remove(attr)
        conv.attribute.append(helper.make_attribute("pads", merged))
        conv.input[0] = pad.input[0]
        graph.node.remove(pad)


def fused_model(qmodel, input_data, input_names=None, output_names=None,
                dynamic_axes=None) -> tuple[onnx.ModelProto, dict]:
    """The BN-folded float model in ONNX with the layer -> node map in its metadata, and the map."""
    model = float_copy(qmodel).eval()
    layers = {name: m for name, m in qmodel.named_modules() if isinstance(m, QuantLayer)}
    args = input_data if isinstance(input_data, tuple) else (input_data,)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, buffer, dynamo=False, opset_version=OPSET, input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=True)
    onnx_model = onnx.load_from_string(buffer.getvalue())
    _fold_shapes(onnx_model)
    _fold_pads(onnx_model.graph)
    _drop_unused(onnx_model.graph)
    digests = {}
    for name, layer in layers.items():
        weight = layer.layer.weight.detach().cpu().numpy()
        digests.setdefault(_digest(weight), []).append(name)
        if weight.ndim == 2:
            digests.setdefault(_digest(weight.T), []).append(name)  # Gemm without transB
    inits = {i.name: i for i in onnx_model.graph.initializer}
    mapping = {}
    for node in onnx_model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        init = inits.get(node.input[1])
        if init is None:
            continue
        for name in digests.get(_digest(numpy_helper.to_array(init)), []):
            if name in mapping:
                continue
            layer = layers[name]
            if node.op_type in ("Conv", "ConvTranspose"):
                axis = layer.axis
            elif node.op_type == "Gemm":
                trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
                axis = 0 if trans_b else 1
            else:
                axis = 1
            mapping[name] = {"node": node.name, "op": node.op_type, "weight": node.input[1], "axis": axis,
                             "act_bits": layer.input_quantizer.params.num_bits,
                             "weight_bits": layer.weight_quantizer.params.num_bits,
                             "num_steps": layer.weight_quantizer.params.num_steps}
            break
    missing = sorted(set(layers) - set(mapping))
    if missing:
        raise RuntimeError(f"could not find the ONNX nodes of layers {missing} in the exported model")
    del onnx_model.metadata_props[:]
    onnx_model.metadata_props.add(key=META_KEY, value=json.dumps(mapping))
    return onnx_model, mapping


def read_fused(path: str) -> tuple[onnx.ModelProto, dict]:
    model = onnx.load(path)
    meta = {p.key: p.value for p in model.metadata_props}
    if META_KEY not in meta:
        raise ValueError(f"{path}: not a model written by openamct quantize_model (no '{META_KEY}' metadata)")
    return model, json.loads(meta[META_KEY])
