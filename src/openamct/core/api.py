"""Native API: `quantize()` for the common case; `default_config` / `prepare` / `calibrate` / `convert` underneath
(export to ONNX: openamct.onnx_export.export).

    config = openamct.default_config(model, x, rules=[openamct.Rule(types="Linear", weight={"num_bits": 4})])
    qmodel = openamct.quantize(model, config, lambda m: [m(b) for b in batches], x)
    openamct.export(qmodel, "out/model", x)   # out/model_deploy_model.onnx, out/model_fake_quant_model.onnx

`prepare` returns a copy (the user's model is never changed): BN folded into convs, each quantizable layer wrapped
in a QuantLayer whose observers collect statistics on each forward. `convert` computes the quantization
parameters and turns the copy into the fake-quant simulation of the deployed INT8 model.
"""
import copy
from collections import Counter

import torch
from torch import nn
from tqdm import tqdm

from . import log
from .capture import (
    ModelInfo,
    capture,
    check_finite,
    fold_bn,
    fusions,
    layer_groups,
    output_site,
    pooled_inputs,
    set_module,
    weight_axis,
)
from .config import (
    ConfigError,
    LayerConfig,
    QuantConfig,
    ReconstructionParams,
    Rule,
    apply_rules,
    check_names,
    check_nuq_types,
)
from .layer import QuantLayer
from .quantizers import ActQuantizer
from .reconstruction import Recorder, float_parameters, reconstruct
from .simulation import enter_simulation, exit_simulation
from .weights import finish_weights


def default_config(model: nn.Module, input_data, *, rules=(), skip_layers=(), batch_num: int = 1,
                   activation_offset: bool = True, reconstruction: ReconstructionParams | None = None) -> QuantConfig:
    """W8A8 (per-channel ARQ weights with GPTQ and bias correction, IFMR activations) on every quantizable layer,
    changed by `rules` (config.Rule, in order, later ones winning); `skip_layers` stay float; `reconstruction`:
    block reconstruction after calibration (core/reconstruction.py)."""
    info = capture(model, input_data)
    check_names(skip_layers, info.layers, "skip_layers entry")
    rules = tuple(rules) + tuple(Rule(name, quant_enable=False) for name in skip_layers)
    layers = apply_rules(LayerConfig(), rules, info.layers, layer_groups(info))
    check_nuq_types(layers, info.layers)
    balanced = [name for name, layer in layers.items() if layer.dmq_balancer_param is not None]
    if balanced:
        raise ConfigError(f"a rule sets dmq_balancer_param (layer '{balanced[0]}'): DMQ balancing needs a pass over "
                          f"the data before calibration, which only the AMCT flow runs (quantize_preprocess)")
    return QuantConfig(layers=layers, batch_num=batch_num, activation_offset=activation_offset,
                       reconstruction=reconstruction)


def quant_layers(model: nn.Module) -> dict:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLayer)}


def prepare(model: nn.Module, config: QuantConfig, input_data, *, info: ModelInfo | None = None,
            make_quantizer=None, make_layer=None) -> nn.Module:
    """A calibration copy of `model`: BN folded, QuantLayers in place. Logs what is and is not quantized.

    `info`: the model's capture, when the caller already has it. `make_quantizer(name, bounds)` and
    `make_layer(layer, name, input_quantizer, axis, output_quantizer)` build the quantizers and layers (QAT passes
    learning ones); by default the PTQ ActQuantizer and QuantLayer."""
    check_finite(model)
    info = info or capture(model, input_data)
    check_names(config.layers, info.layers, "layer")
    check_names(config.skip_fusion_layers, info.layers, "skip_fusion_layers entry")
    pairs, not_folded = fusions(info, config.do_fusion, config.skip_fusion_layers)
    qmodel = copy.deepcopy(model).eval()
    _channels_last(qmodel, input_data)
    for conv_name, bn_name in pairs.items():
        if fold_bn(qmodel.get_submodule(conv_name), qmodel.get_submodule(bn_name)):
            set_module(qmodel, bn_name, nn.Identity())
            log.info(f"Fuse '{bn_name}' into '{conv_name}'.", "ConvBnFusion")
        else:
            log.warning(f"'{bn_name}' not fused into '{conv_name}': the result would not be finite.", "ConvBnFusion")
    for bn_name, reason in not_folded.items():
        log.info(f"'{bn_name}' not fused: {reason}.", "ConvBnFusion")
    quantizers = {}  # tensor id -> its ActQuantizer, shared by every layer that reads or writes it

    if make_layer is None:
        def make_layer(layer, name, input_quantizer, axis, output_quantizer):
            return QuantLayer(layer, config.layers[name], input_quantizer, name, axis, output_quantizer)
    if make_quantizer is None:
        def make_quantizer(name, bounds):
            return ActQuantizer(config.layers[name].activation, config.asymmetric(name), config.batch_num, bounds,
                                name)

    def quantizer(tensor_id, name, bounds=None):
        if tensor_id not in quantizers:
            quantizers[tensor_id] = make_quantizer(name, bounds)
        return quantizers[tensor_id]

    enabled = config.enabled()
    # layers the config keeps float read their input unquantized (AMCT's fallback): a tensor only they read stays
    # float, even though the layer writing it then runs in float in ONNX Runtime
    float_readers = Counter(info.input_tensor[name] for name in info.layers
                            if name not in enabled and name in info.input_tensor)
    sites = {name: output_site(info, info.bn_output[pairs[name]] if name in pairs else info.output_tensor[name])
             for name in enabled}
    shared = _max_pool_sharing(info, enabled, sites)
    inputs = {name: shared.get(info.input_tensor[name], info.input_tensor[name]) for name in enabled}
    for name in enabled:
        quantizer(inputs[name], name, info.input_bounds.get(name))
    for name in enabled:
        layer = qmodel.get_submodule(name)
        output, bounds, readers = sites[name]
        # the output is quantized where something other than a layer reads it (an add, hardswish, a pooling, ...):
        # without a quantize after it ONNX Runtime runs the layer in float (DQ -> Conv -> float). Not after a
        # Linear on more than two dims: exported as MatMul + Add (the bias), it runs as MatMulIntegerToFloat, on
        # integers with a float output, whether quantized after or not; a quantize there only adds a pass, and
        # splits the bias Add from what follows, which ONNX Runtime otherwise fuses (BiasGelu)
        wants_output = len(readers) > float_readers[output] and name not in info.matmul_linears and \
            (output not in quantizers or output in shared.values())
        wrapped = make_layer(layer, name, quantizers[inputs[name]], weight_axis(layer),
                             quantizer(output, name, bounds) if wants_output else None)
        set_module(qmodel, name, wrapped)
    parameter = next(model.parameters(), None)
    if parameter is not None:
        qmodel.to(parameter.device)  # the new quantizer buffers follow the model
    qmodel.register_forward_pre_hook(enter_simulation)
    qmodel.register_forward_hook(exit_simulation, always_call=True)
    if config.reconstruction is not None:  # the calibration batches, kept for block reconstruction in convert
        qmodel.block_reconstruction = Recorder(config.reconstruction, config.batch_num, qmodel)
    _log_coverage(qmodel, config, info)
    return qmodel


def _max_pool_sharing(info: ModelInfo, enabled, sites: dict) -> dict:
    """Input tensor of a layer -> the tensor whose quantizer it shares: a max pool's output shares the quantizer
    of its input where that is a quantized layer's output no layer reads directly. Pooling commutes with
    quantization, so the simulation is unchanged in kind, and the deployed model pools the integers: ONNX Runtime
    drops a DequantizeLinear -> MaxPool -> QuantizeLinear of one scale, where different scales keep the pool in
    float between layout changes."""
    pooled = pooled_inputs(info)
    direct = {info.input_tensor[name] for name in enabled}
    produced = {site[0] for site in sites.values()}
    return {tensor: pooled[tensor] for tensor in direct
            if tensor in pooled and pooled[tensor] in produced and pooled[tensor] not in direct}


def _channels_last(model: nn.Module, input_data) -> None:
    """Store the copy's 4-D weights channels_last, so that its convs (and the activations they hand on) run in the
    layout CPU and GPU conv kernels are fastest in, unless the model's forward then fails (code that `.view`s a
    feature map); its outputs are the same numbers either way."""
    maps = [p for p in model.parameters() if p.dim() == 4]
    if not maps:
        return

    def relayout(memory_format):
        for parameter in maps:
            parameter.data = parameter.data.contiguous(memory_format=memory_format)

    relayout(torch.channels_last)
    try:
        with torch.no_grad():
            model(*(input_data if isinstance(input_data, (tuple, list)) else (input_data,)))
    except RuntimeError as err:
        relayout(torch.contiguous_format)
        log.info(f"Calibrating in the default memory layout: the model fails in channels_last ({err}).", "Layout")


def _log_coverage(qmodel: nn.Module, config: QuantConfig, info) -> None:
    enabled = config.enabled()
    total = len(info.layers) + len(info.skipped)
    log.info(f"Quantize {len(enabled)} of {total} layers with weights.", "Coverage")
    layers = quant_layers(qmodel)
    for name, types in info.layers.items():
        if name in layers:
            steps = layers[name].pipeline  # run only where statistics are collected: QAT layers learn their weights
            state = "quantized" + (f" (weights: {', '.join(steps)})" if layers[name].collects_statistics else "")
        else:
            state = "skipped by config"
        log.info(f"  {name} ({types[0]}): {state}", "Coverage")
    for name, reason in info.skipped.items():
        log.warning(f"  {name}: not quantized: {reason}", "Coverage")


def calibrate(qmodel: nn.Module, calibrate_fn) -> nn.Module:
    """Run the user's `calibrate_fn(qmodel)` (its own batches) without gradients, then `convert`."""
    with torch.no_grad():
        calibrate_fn(qmodel)
    return convert(qmodel)


def convert(qmodel: nn.Module) -> nn.Module:
    """Compute every layer's quantization parameters from the statistics; the model becomes the simulation. Where
    the config asks for block reconstruction, it follows, on the calibration batches recorded meanwhile."""
    layers = quant_layers(qmodel)
    recorder = qmodel.__dict__.pop("block_reconstruction", None)
    if recorder is not None:
        recorder.handle.remove()
        floats = float_parameters(layers)
    for name, layer in tqdm(layers.items(), desc="activation ranges", unit="layer", leave=False,
                            disable=len(layers) < 8):
        for quantizer in (layer.input_quantizer, layer.output_quantizer):
            if quantizer is not None and not quantizer.calibrated:
                log.info(f"Use {quantizer.batches_seen} batch to do layer {name} data calibration.",
                         quantizer.params.act_algo.upper())
                quantizer.finish()
    finish_weights(list(layers.values()))
    if recorder is not None:
        reconstruct(qmodel, layers, floats, recorder)
    return qmodel


def is_calibrated(qmodel: nn.Module) -> bool:
    layers = quant_layers(qmodel).values()
    return bool(layers) and all(layer.input_quantizer.calibrated for layer in layers)


def records(qmodel: nn.Module) -> dict:
    """Layer name -> LayerRecord of a calibrated model."""
    return {name: layer.record() for name, layer in quant_layers(qmodel).items()}


def quantize(model: nn.Module, config: QuantConfig, calibrate_fn, input_data) -> nn.Module:
    """prepare + calibrate: the calibrated simulation model (a copy; `model` is left as it was)."""
    return calibrate(prepare(model, config, input_data), calibrate_fn)
