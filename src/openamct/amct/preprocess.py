"""AMCT's quantize_preprocess (spec 2.4): the DMQ balancer's pre-pass, and quantize_model's use of its record.

The flow, as in AMCT: create_quant_config with a `.cfg` holding `dmq_balancer { migration_strength }` (the JSON
config then has `dmq_balancer_param` on those layers) -> quantize_preprocess(config_file, record_file, model, x),
and batch_num batches through the model it returns -> the factors are in record_file as tensor_balance_factor ->
quantize_model(config_file, modified_onnx_file, record_file, model, x) reads them and balances those layers before
calibration -> save_model. The factors and the algorithm: core/algorithms/dmq.py.
"""
import copy
import os

import torch
from torch import nn

from ..core import log
from ..core.algorithms import dmq
from ..core.api import prepare, quant_layers
from ..core.capture import ModelInfo, capture, check_finite, fold_bn, fusions, set_module
from ..core.config import ConfigError, QuantConfig
from ..core.fileio import write_text
from . import amct_log
from .config_files import load_json
from .record import read_record, write_balance_factors


def _strengths(config: QuantConfig) -> dict:
    """Layer name -> migration strength, for the quantized layers the config balances."""
    return {name: layer.dmq_balancer_param for name, layer in config.layers.items()
            if layer.quant_enable and layer.dmq_balancer_param is not None}


def _folded_copy(model: nn.Module, config: QuantConfig, info: ModelInfo) -> nn.Module:
    """A copy of `model` with BN folded as quantize_model will fold it: the factors are balanced against the
    weights the quantized layers will hold."""
    check_finite(model)
    folded = copy.deepcopy(model).eval()
    pairs, _ = fusions(info, config.do_fusion, config.skip_fusion_layers)
    for conv_name, bn_name in pairs.items():
        if fold_bn(folded.get_submodule(conv_name), folded.get_submodule(bn_name)):
            set_module(folded, bn_name, nn.Identity())
    return folded


def quantize_preprocess(config_file, record_file, model, input_data):
    """The DMQ balancer's calibration model: a copy of `model` (BN folded, in eval mode) that computes as the float
    model and records the range of each input channel of the layers the config balances. Run `batch_num` batches
    through it; after the last one each layer's factors go to `record_file` as tensor_balance_factor. Then call
    quantize_model with the same `record_file`."""
    amct_log.install()
    info = capture(model, input_data)
    config = load_json(config_file, known_layers=info.layers)
    strengths = _strengths(config)
    if not strengths:
        raise ConfigError(f"{config_file}: no quantized layer has dmq_balancer_param, so quantize_preprocess has "
                          f"nothing to balance (set dmq_balancer in the .cfg given to create_quant_config)")
    balanced = _folded_copy(model, config, info)
    ranges = {name: dmq.InputRange(balanced.get_submodule(name)) for name in strengths}
    write_text(record_file, "")
    handles = [balanced.get_submodule(name).register_forward_pre_hook(
        lambda module, args, observed=observed: observed.observe(args[0])) for name, observed in ranges.items()]
    batches = 0

    def finish(module, args, output):
        nonlocal batches
        batches += 1
        if batches < config.batch_num:
            return
        for handle in handles:
            handle.remove()
        write_balance_factors(record_file, {name: observed.factors(strengths[name]).tolist()
                                            for name, observed in ranges.items()})
        log.info(f"DMQ balancing of {len(ranges)} layers done on {batches} batches; factors written to "
                 f"{os.path.realpath(record_file)}", "DMQBalancer")

    handles.append(balanced.register_forward_hook(finish))
    return balanced


def _balanced_capture(model: nn.Module, input_data, inverses: dict) -> ModelInfo:
    """The capture of `model` with each balanced layer reading its input times 1/s, as its QuantLayer will: that
    product is a tensor of its own, so the layer gets an input quantizer of its own (not one shared with the other
    readers of the unbalanced tensor), as the exported models' Mul gives it its own QuantizeLinear."""
    handles = [model.get_submodule(name).register_forward_pre_hook(
        lambda module, args, inverse=inverse: (args[0] * inverse.to(args[0]),) + tuple(args[1:]))
        for name, inverse in inverses.items()]
    try:
        return capture(model, input_data)
    finally:
        for handle in handles:
            handle.remove()


def prepare_balanced(model: nn.Module, config: QuantConfig, input_data, info: ModelInfo, record_file: str):
    """quantize_model's calibration model: core.prepare, with the factors quantize_preprocess wrote to
    `record_file` applied to the layers the config balances (QuantLayer.balance_input)."""
    strengths = _strengths(config)
    if not strengths:
        return prepare(model, config, input_data, info=info)
    stored = read_record(record_file) if os.path.exists(record_file) else {}
    missing = sorted(name for name in strengths if not (name in stored and stored[name].tensor_balance_factor))
    if missing:
        raise RuntimeError(f"quantize_model: the config balances layers {missing} (dmq_balancer_param), but "
                           f"{record_file} holds no tensor_balance_factor for them: run quantize_preprocess with "
                           f"this record file and its batch_num batches first")
    factors = {name: torch.tensor(stored[name].tensor_balance_factor) for name in strengths}
    for name, values in factors.items():
        channels = dmq.weight_channel_max(model.get_submodule(name)).numel()
        if values.numel() != channels:
            raise RuntimeError(f"quantize_model: {record_file}: layer '{name}' has {values.numel()} "
                               f"tensor_balance_factor values for {channels} input channels (a record of another "
                               f"model?)")
    inverses = {name: dmq.inverse_view(model.get_submodule(name), values) for name, values in factors.items()}
    qmodel = prepare(model, config, input_data, info=_balanced_capture(model, input_data, inverses))
    layers = quant_layers(qmodel)
    for name, values in factors.items():
        layers[name].balance_input(values)
    log.info(f"DMQ factors of {len(factors)} layers applied from {os.path.realpath(record_file)}", "DMQBalancer")
    return qmodel
