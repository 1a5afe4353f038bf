"""Model capture without torch.fx: which layers can be quantized, which BNs fold, what bounds each input.

One forward pass on the example input runs under a TorchFunctionMode that records, for every tensor, the
function that produced it and how many functions consumed it. Module hooks tie tensors to module names.
This works on models that FX cannot trace (data-dependent Python, EfficientNet-style padding). The capture does
not depend on the config: one pass serves checking a config's names and building the calibration model.
"""
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .config import InputError

QUANTIZABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear)
_BN_FOR_CONV = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}
_ADDS = {"add", "add_", "__add__", "__radd__", "__iadd__"}
_NOT_USES = {"size", "dim", "numel", "__get__", "__len__", "is_floating_point", "element_size"}
MAX_POOLS = {"max_pool1d", "max_pool2d", "max_pool3d"}  # their outputs are values of their inputs


def type_names(module: nn.Module) -> tuple[str, ...]:
    """The module's class name and those of its torch.nn bases, so `Conv2d` also matches a Conv2d subclass."""
    names = [type(module).__name__]
    names += [cls.__name__ for cls in QUANTIZABLE if isinstance(module, cls) and cls.__name__ not in names]
    return tuple(names)


def weight_axis(module: nn.Module) -> int:
    """Axis of the output channels in the weight (ConvTranspose stores them second)."""
    return 1 if isinstance(module, nn.ConvTranspose2d) else 0


def unsupported_reason(module: nn.Module, shared: bool) -> str | None:
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)):
        if module.padding_mode != "zeros":
            return f"padding_mode '{module.padding_mode}' (only 'zeros' is supported)"
        if isinstance(module, nn.ConvTranspose2d) and module.groups > 1:
            return "grouped ConvTranspose2d"
    if shared:
        return "its weight is shared with another layer"
    return None


@dataclass
class ModelInfo:
    """What one traced forward pass tells about a model."""
    layers: dict = field(default_factory=dict)        # quantizable name -> type names
    skipped: dict = field(default_factory=dict)       # name -> reason it cannot be quantized
    bn_pairs: dict = field(default_factory=dict)      # conv name -> bn name (foldable)
    bn_not_folded: dict = field(default_factory=dict)  # bn name -> reason
    depthwise: set = field(default_factory=set)      # names of the depthwise Conv2d layers
    input_bounds: dict = field(default_factory=dict)  # layer name -> (lo, hi) guaranteed by the producer
    input_tensor: dict = field(default_factory=dict)  # layer name -> id of its input tensor in the traced pass
    output_tensor: dict = field(default_factory=dict)  # layer name -> id of its output
    bn_output: dict = field(default_factory=dict)     # foldable bn name -> id of its output
    adds: set = field(default_factory=set)           # ids of tensors that an elementwise add consumes
    consumers: dict = field(default_factory=dict)    # tensor id -> [(function, output id, clip bounds or None)]
    matmul_linears: set = field(default_factory=set)  # Linear layers called on inputs of more than two dims


def clip_bounds(func, args, kwargs) -> tuple[float, float] | None:
    """Output range guaranteed by a clamping activation (ReLU, ReLU6, hardtanh, clamp), else None."""
    name = getattr(func, "__name__", "")
    if name in ("relu", "relu_"):
        return (0.0, math.inf)
    if name in ("relu6",):
        return (0.0, 6.0)
    if name in ("hardtanh", "hardtanh_"):
        lo = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
        hi = kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)
        return (float(lo), float(hi))
    if name in ("clamp", "clip", "clamp_", "clip_"):
        lo = kwargs.get("min", args[1] if len(args) > 1 else None)
        hi = kwargs.get("max", args[2] if len(args) > 2 else None)
        if isinstance(lo, torch.Tensor) or isinstance(hi, torch.Tensor):
            return None
        return (-math.inf if lo is None else float(lo), math.inf if hi is None else float(hi))
    return None


class _Recorder(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.uses = Counter()
        self.adds = set()
        self.consumers = defaultdict(list)
        self.bounds = {}
        self.keep = []  # holds every tensor so that ids stay unique during the pass

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        bounds = clip_bounds(func, args, kwargs) if isinstance(out, torch.Tensor) else None
        if name not in _NOT_USES:
            for t in tree_leaves((args, kwargs)):
                if isinstance(t, torch.Tensor):
                    self.uses[id(t)] += 1
                    self.keep.append(t)
                    self.consumers[id(t)].append((name, id(out), bounds))
                    if name in _ADDS:
                        self.adds.add(id(t))
        if isinstance(out, torch.Tensor):
            self.keep.append(out)
            if bounds is None and name in MAX_POOLS and id(args[0]) in self.bounds:
                bounds = self.bounds[id(args[0])]  # not a clip: kept out of the consumers' entries above
            if bounds is not None:
                self.bounds[id(out)] = bounds
            elif id(out) in self.bounds:  # ids are never reused here, so this is an in-place change
                del self.bounds[id(out)]
        return out


def _as_tuple(input_data):
    return input_data if isinstance(input_data, (tuple, list)) else (input_data,)


def capture(model: nn.Module, input_data) -> ModelInfo:
    """Run one forward pass and report quantizable layers, foldable BNs and input bounds."""
    info = ModelInfo()
    modules = dict(model.named_modules())
    weight_owners = Counter(id(m.weight) for m in modules.values()
                            if isinstance(getattr(m, "weight", None), nn.Parameter))
    recorder = _Recorder()
    calls = {}  # module name -> (input id, output id) of its first call
    handles = []

    def pre_hook(name):
        def hook(module, args):
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if name in calls:
                return
            calls[name] = [id(x) if x is not None else None, None]
            if isinstance(module, QUANTIZABLE) and x is not None and id(x) in recorder.bounds:
                info.input_bounds.setdefault(name, recorder.bounds[id(x)])
            if isinstance(module, nn.Linear) and x is not None and x.dim() > 2:
                info.matmul_linears.add(name)
        return hook

    def mark_called(name):
        def hook(module, args):
            calls.setdefault(name, [None, None])
        return hook

    def post_hook(name):
        def hook(module, args, output):
            if isinstance(output, torch.Tensor) and calls[name][1] is None:
                calls[name][1] = id(output)
                recorder.keep.append(output)
        return hook

    for name, module in modules.items():
        if isinstance(module, QUANTIZABLE + (nn.modules.batchnorm._BatchNorm,)):
            handles.append(module.register_forward_pre_hook(pre_hook(name)))
            handles.append(module.register_forward_hook(post_hook(name)))
        else:
            handles.append(module.register_forward_pre_hook(mark_called(name)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), recorder:
            model(*_as_tuple(input_data))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    called = set(calls)
    conv_out = {calls[n][1]: n for n, m in modules.items() if isinstance(m, tuple(_BN_FOR_CONV)) and n in calls}
    bn_in = {n: calls[n][0] for n, m in modules.items()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and n in calls}

    for name, module in modules.items():
        if isinstance(module, QUANTIZABLE):
            reason = unsupported_reason(module, weight_owners[id(module.weight)] > 1)
            if name not in called:
                reason = "not called in the forward pass of the example input"
            if reason:
                info.skipped[name] = reason
            else:
                info.layers[name] = type_names(module)
                if isinstance(module, nn.Conv2d) and 1 < module.groups == module.in_channels:
                    info.depthwise.add(name)
        elif any(p.requires_grad for p in module.parameters(recurse=False)) and \
                not isinstance(module, nn.modules.batchnorm._BatchNorm):
            info.skipped[name] = f"layer type {type(module).__name__} is not supported"

    for bn_name, tensor_id in bn_in.items():
        bn = modules[bn_name]
        conv_name = conv_out.get(tensor_id)
        if conv_name is None:
            info.bn_not_folded[bn_name] = "its input does not come straight from a Conv layer"
            continue
        conv = modules[conv_name]
        reason = None
        if type(bn) is not _BN_FOR_CONV[next(c for c in _BN_FOR_CONV if isinstance(conv, c))]:
            reason = "BatchNorm dimensionality differs from the conv's"
        elif not (bn.affine and bn.track_running_stats):
            reason = "BatchNorm without affine or running statistics"
        elif conv.padding_mode != "zeros":
            reason = "conv padding_mode is not 'zeros'"
        elif recorder.uses[tensor_id] != 1:
            reason = f"the output of '{conv_name}' has other consumers"
        if reason:
            info.bn_not_folded[bn_name] = reason
        else:
            info.bn_pairs[conv_name] = bn_name
    for name in info.layers:
        info.input_tensor[name] = calls[name][0]
        info.output_tensor[name] = calls[name][1]
    info.bn_output = {bn_name: calls[bn_name][1] for bn_name in info.bn_pairs.values()}
    info.adds = recorder.adds
    info.consumers = dict(recorder.consumers)
    return info


def output_site(info: ModelInfo, tensor_id: int) -> tuple[int, tuple | None, list]:
    """Where a layer's output would be quantized: (the tensor, the clipping it has passed through or None, the
    functions that read it). The output is followed through clamping activations (ReLU, ReLU6, hardtanh, clamp)
    while such an activation is its only reader, in place or not, because ONNX Runtime fuses them into the
    integer kernel's output (QLinearConv requantizes after them); the quantizer goes after the last one."""
    bounds = None
    readers = list(info.consumers.get(tensor_id, ()))
    while readers and readers[0][2] is not None and (readers[0][1] == tensor_id or len(readers) == 1):
        name, out, clip = readers.pop(0)
        bounds = clip if bounds is None else (max(bounds[0], clip[0]), min(bounds[1], clip[1]))
        if out != tensor_id:  # not in place: the clip's output is the tensor from here on
            tensor_id, readers = out, list(info.consumers.get(out, ()))
    return tensor_id, bounds, [reader[0] for reader in readers]


def pooled_inputs(info: ModelInfo) -> dict:
    """Tensor id of each max pool's output -> id of its input."""
    return {out: tensor for tensor, readers in info.consumers.items() for name, out, _ in readers if name in MAX_POOLS}


def fold_bn(conv: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> bool:
    """Fold `bn` into `conv` in place (spec 4.7); False, and nothing changed, if the result is not finite."""
    std = torch.sqrt(bn.running_var + bn.eps)
    factor = bn.weight / std
    weight = conv.weight * factor.reshape([-1] + [1] * (conv.weight.dim() - 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    bias = (bias - bn.running_mean) * factor + bn.bias
    if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
        return False
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias = nn.Parameter(bias.detach().clone())
    return True


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def check_finite(model: nn.Module) -> None:
    """Refuse a model whose parameters or floating-point buffers (BN statistics) hold NaN or Inf, naming the layer
    and the parameter: quantizing it would only fail later, at a layer that reads the damage."""
    for name, module in model.named_modules():
        tensors = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for tensor_name, tensor in tensors:
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                bad = int((~torch.isfinite(tensor)).sum())
                raise InputError(f"layer '{name or type(model).__name__}': {tensor_name} holds {bad} NaN or Inf "
                                 f"value(s) of {tensor.numel()}: the model cannot be quantized; check its weights "
                                 f"(the checkpoint, or a training run that diverged)")


def fusions(info: ModelInfo, do_fusion: bool = True, skip_fusion_layers=()) -> tuple[dict, dict]:
    """(conv -> bn to fold, bn -> reason it is not folded) under the config's fusion options."""
    pairs, not_folded = {}, dict(info.bn_not_folded)
    for conv_name, bn_name in info.bn_pairs.items():
        if not do_fusion:
            not_folded[bn_name] = "do_fusion is false"
        elif conv_name in skip_fusion_layers:
            not_folded[bn_name] = f"'{conv_name}' is in skip_fusion_layers"
        else:
            pairs[conv_name] = bn_name
    return pairs, not_folded


def layer_groups(info: ModelInfo) -> dict:
    """Group name -> layer names (config.LAYER_GROUPS): "first", the layer the input reaches first (the stem conv),
    and "depthwise", Conv2d with one input channel per group."""
    return {"first": set(list(info.layers)[:1]), "depthwise": set(info.depthwise)}


def group_members(info: ModelInfo, groups) -> list[str]:
    """The layers of any of the named `groups`, in capture order."""
    members = layer_groups(info)
    return [name for name in info.layers if any(name in members[group] for group in groups)]
