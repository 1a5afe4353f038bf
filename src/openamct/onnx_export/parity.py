"""Exported-model parity: ONNX Runtime outputs against the PyTorch simulation, and where they part."""
import numpy as np
import onnx
import onnxruntime as ort
import torch

from ..core.layer import QuantLayer

# relative max-abs difference (to the output's range) beyond which an exported model is said to diverge: a few
# roundings flip where ONNX Runtime's float arithmetic differs from PyTorch's in the last bit, so not 0
TOLERANCE = 5e-2


def session(model, threads: int = 0, spin: bool = True) -> ort.InferenceSession:
    """A CPU session; `spin=False` stops its idle threads busy-waiting, which would slow another session run
    between two of its runs."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _on_device(qmodel, inputs) -> tuple:
    device = next(qmodel.parameters()).device
    return tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in inputs)


def _feeds(sess: ort.InferenceSession, inputs) -> dict:
    return {i.name: t.detach().cpu().numpy() for i, t in zip(sess.get_inputs(), inputs)}


def compare(reference: np.ndarray, output: np.ndarray) -> dict:
    diff = float(np.abs(reference - output).max())
    span = float(np.abs(reference).max()) or 1.0
    report = {"max_abs_diff": diff, "relative_diff": diff / span}
    if reference.ndim == 2 and reference.shape[1] > 1:
        report["top1_agreement"] = float((reference.argmax(1) == output.argmax(1)).mean())
    return report


def first_divergent_layer(onnx_model: onnx.ModelProto, mapping: dict, qmodel, inputs, tolerance: float):
    """Name of the first quantized layer (in execution order) whose output differs beyond `tolerance`."""
    outputs = {}

    def keep(name):
        def hook(module, args, output):
            outputs.setdefault(name, output.detach().cpu().numpy())
        return hook

    hooks = [m.register_forward_hook(keep(name)) for name, m in qmodel.named_modules() if isinstance(m, QuantLayer)]
    try:
        with torch.no_grad():
            qmodel(*_on_device(qmodel, inputs))
    finally:
        for h in hooks:
            h.remove()
    probe = onnx.ModelProto()
    probe.CopyFrom(onnx_model)
    node_out = {n.name: n.output[0] for n in probe.graph.node}
    produced = {o for n in probe.graph.node for o in n.output}

    def layer_output(layer):
        """The tensor holding what the QuantLayer returns: after its output quantizer, or its dequantizing Mul."""
        for name in (f"{layer}.quant_out.dq", node_out.get(f"{layer}.dequant")):
            if name in produced:
                return name
        return node_out[mapping[layer]["node"]]

    names = [layer for layer in outputs if layer in mapping]
    tensors = [layer_output(n) for n in names]
    probe.graph.output.extend(onnx.ValueInfoProto(name=t) for t in tensors)
    sess = session(probe)
    results = sess.run(tensors, _feeds(sess, inputs))
    for name, value in zip(names, results):
        if compare(outputs[name], value)["relative_diff"] > tolerance:
            return name
    return None


def _chunks(inputs: tuple, chunk: int) -> list[tuple]:
    """`inputs` (a tuple of model inputs) split along the batch dim of its tensors, `chunk` samples each."""
    n = next(len(t) for t in inputs if isinstance(t, torch.Tensor))
    return [tuple(t[i:i + chunk] if isinstance(t, torch.Tensor) else t for t in inputs) for i in range(0, n, chunk)]


def check(models: dict, mapping: dict, qmodel, inputs, chunk: int = 8) -> dict:
    """Run each exported model (kind -> ModelProto) in ONNX Runtime and compare with `qmodel` on `inputs`.

    The simulation runs `chunk` samples at a time; ONNX Runtime one session and one sample at a time, where its
    CPU provider is fastest and its arena, which keeps what the largest run needed, smallest (an unfused
    fake-quant graph needs several times the float model's memory per sample)."""
    batch = next(iter(models.values())).graph.input[0].type.tensor_type.shape.dim[0]
    fixed = batch.dim_value if batch.HasField("dim_value") else None  # exported without a dynamic batch axis
    if fixed:
        inputs = _chunks(inputs, fixed)[0]
    with torch.no_grad():
        reference = np.concatenate([qmodel(*_on_device(qmodel, part)).detach().cpu().numpy()
                                    for part in _chunks(inputs, fixed or chunk)])
    report = {}
    for kind, model in models.items():
        sess = session(model)
        output = np.concatenate([sess.run(None, _feeds(sess, part))[0] for part in _chunks(inputs, fixed or 1)])
        del sess  # before the next session is built
        result = compare(reference, output)
        result["ok"] = result["relative_diff"] <= TOLERANCE and result.get("top1_agreement", 1.0) >= 0.9
        if not result["ok"]:
            result["first_divergent_layer"] = first_divergent_layer(model, mapping, qmodel, inputs, TOLERANCE)
        report[kind] = result
    return report


def describe(kind: str, result: dict) -> str:
    """One line on an exported model's parity with the simulation (log, CLI summaries and benchmarks alike)."""
    line = (f"{kind} model: max abs diff {result['max_abs_diff']:.4g} (relative {result['relative_diff']:.3g})")
    if "top1_agreement" in result:
        line += f", top-1 agreement {100 * result['top1_agreement']:.1f}%"
    return line + ("  ok" if result["ok"] else f"  DIVERGES from layer {result.get('first_divergent_layer')}")
