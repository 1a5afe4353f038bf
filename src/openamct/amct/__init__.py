"""AMCT-compatible calls: create_quant_config, quantize_model, save_model (PTQ, spec 2.1) and the four QAT calls
create_quant_retrain_config, create_quant_retrain_model, restore_quant_retrain_model, save_quant_retrain_model
(spec 2.2).

`import openamct as amct` runs an AMCT calibration script unchanged. These calls are a thin file-based layer on
the native core: they read and write AMCT's files (config JSON and .cfg, record, fused model) and log in AMCT's
format (amct/amct_log.py); the work is the core's and onnx_export's.
"""
import os
import weakref

import torch

from ..core import log, qat
from ..core.algorithms import nuq
from ..core.api import convert, default_config, is_calibrated, prepare, quant_layers, records
from ..core.capture import capture
from ..core.config import NUQ_TYPES, ConfigError, LayerConfig, QuantConfig, RetrainConfig, RetrainLayerConfig
from ..core.fileio import is_main_process, write_bytes, write_text
from ..core.simulation import DATA_PARALLEL_UNSUPPORTED
from ..onnx_export import export, write_models
from ..onnx_export.fused import fused_model, read_fused
from . import amct_log
from .atc_mapping import flagged_names
from .config_files import (
    config_from_cfg,
    load_json,
    load_retrain_json,
    parse_cfg,
    retrain_config_from_cfg,
    save_json,
    save_retrain_json,
)
from .preprocess import prepare_balanced, quantize_preprocess
from .record import read_record, write_record

# calibration models by fused-model path, so save_model can check parity against the PyTorch simulation
_CALIBRATIONS = weakref.WeakValueDictionary()


def create_quant_config(config_file, model, input_data, skip_layers=None, batch_num=1, activation_offset=True,
                        config_defination=None):
    """Write the per-layer JSON config for `model`; with `config_defination` (a .cfg) the other options come from it."""
    amct_log.install()
    if config_defination:
        ignored = [name for name, given in (("skip_layers", skip_layers), ("batch_num", batch_num != 1),
                                            ("activation_offset", activation_offset is not True)) if given]
        if ignored:
            log.warning(f"create_quant_config: {', '.join(ignored)} not used: with config_defination they come from "
                        f"{config_defination}, as in AMCT", "Config")
        info = capture(model, input_data)
        nuq_layers = _nuq_layers(config_defination, model, input_data, info)
        config = config_from_cfg(config_defination, info.layers, nuq_layers)
    else:
        config = default_config(model, input_data, skip_layers=tuple(skip_layers or ()), batch_num=batch_num,
                                activation_offset=activation_offset)
    save_json(config, config_file)
    log.info(f"Create quant config file {os.path.realpath(config_file)} success.", "Config")


def _nuq_layers(cfg_path, model, input_data, info) -> set:
    """The layers a cfg's `nuq_config` applies to: those its ATC mapping file flags `_fe_weight_compress`
    (matched by layer name or by the node name in our fused ONNX model), else Conv2d/Linear layers where NUQ pays
    (algorithms/nuq.size_rule)."""
    message = parse_cfg(cfg_path)
    if not message.HasField("nuq_config"):
        return set()
    weights = {name: model.get_submodule(name).weight for name, types in info.layers.items()
               if set(types) & set(NUQ_TYPES)}
    mapping_file = message.nuq_config.mapping_file
    if not mapping_file:
        params = message.nuq_config.nuq_quantize
        chosen = {name for name, weight in weights.items()
                  if nuq.size_rule(weight.shape, params.num_steps, params.codebook)}
        log.info(f"NUQ: no mapping_file, so the {len(chosen)} of {len(weights)} Conv2d/Linear layers where "
                 f"{params.num_steps} levels save at least a quarter of the INT8 weight bytes (codebooks counted) "
                 f"and that have {2 * params.num_steps} or more weights per output channel get non-uniform "
                 f"weights.", "NUQ")
        return chosen
    try:
        flagged = flagged_names(mapping_file)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    qmodel = prepare(model, QuantConfig(layers={name: LayerConfig() for name in info.layers}), input_data, info=info)
    nodes = {name: entry["node"] for name, entry in fused_model(qmodel, input_data)[1].items()}
    chosen = {name for name in weights if name in flagged or nodes.get(name) in flagged}
    if not chosen:
        raise ConfigError(f"{mapping_file}: flags no Conv2d/Linear layer of this model as compressible "
                          f"(_fe_weight_compress); {len(flagged)} flagged names, e.g. {sorted(flagged)[:3]}")
    log.info(f"NUQ: {len(chosen)} layers flagged compressible in {mapping_file}.", "NUQ")
    return chosen


# calibration models by fused-model path, so save_model can check parity against the PyTorch simulation
_CALIBRATIONS = weakref.WeakValueDictionary()


def _capture_sample(module, args):
    """Keep the first calibration batch (at most 16 samples, on CPU) for the export parity check."""
    if getattr(module, "openamct_sample", None) is None:
        module.openamct_sample = tuple(a[:16].detach().cpu() if isinstance(a, torch.Tensor) else a for a in args)


def _finish_when_done(record_file, batch_num, write_fused):
    def hook(module, args, output):
        if not is_calibrated(module) and all(
                layer.input_quantizer.batches_seen >= batch_num for layer in quant_layers(module).values()):
            convert(module)
            write_fused(module)  # once calibrated: bias correction (and NUQ/GPTQ weights) change the float layers
            write_record(record_file, records(module))
            log.info(f"Calibration finished; record written to {os.path.realpath(record_file)}", "Calibration")
    return hook


def quantize_model(config_file, modified_onnx_file, record_file, model, input_data, input_names=None,
                   output_names=None, dynamic_axes=None):
    """The calibration model. Run `batch_num` batches through it; after the last one the record and the fused model
    (with the weights calibration chose) are written."""
    amct_log.install()
    info = capture(model, input_data)
    config = load_json(config_file, known_layers=info.layers)
    qmodel = prepare_balanced(model, config, input_data, info, record_file)  # DMQ: quantize_preprocess's factors

    def write_fused(module):
        fused, _ = fused_model(module, input_data, input_names, output_names, dynamic_axes)
        write_bytes(modified_onnx_file, fused.SerializeToString())

    write_text(record_file, "")
    qmodel.register_forward_pre_hook(_capture_sample)
    qmodel.register_forward_hook(_finish_when_done(record_file, config.batch_num, write_fused))
    _CALIBRATIONS[os.path.realpath(modified_onnx_file)] = qmodel
    return qmodel


def save_model(modified_onnx_file, record_file, save_path):
    """Write `<save_path>_deploy_model.onnx` and `<save_path>_fake_quant_model.onnx` from the fused model + record,
    and check their parity with the calibration model of `modified_onnx_file` when it is still alive."""
    amct_log.install()
    layer_records = read_record(record_file)
    if not layer_records:
        raise RuntimeError(f"save_model: record file {record_file} is empty: calibration has not finished "
                           f"(run batch_num batches through the model returned by quantize_model first)")
    fused, mapping = read_fused(modified_onnx_file)
    missing = sorted(set(mapping) - set(layer_records))
    if missing:
        raise RuntimeError(f"save_model: record file {record_file} has no entry for layers {missing}")
    qmodel = _CALIBRATIONS.get(os.path.realpath(modified_onnx_file))
    return write_models(fused, mapping, layer_records, save_path, qmodel,
                        getattr(qmodel, "openamct_sample", None))


# ---------------------------------------------------------------- QAT (retrain)

def create_quant_retrain_config(config_file, model, input_data, config_defination=None):
    """Write the QAT JSON config for `model`: every quantizable layer with ULQ activations and per-channel
    arq_retrain INT8 weights, or what the simple config `config_defination` (a retrain .cfg) says."""
    amct_log.install()
    model = _unwrap(model)
    info = capture(model, input_data)
    if config_defination:
        config = retrain_config_from_cfg(config_defination, info.layers)
    else:
        config = RetrainConfig(layers={name: RetrainLayerConfig() for name in info.layers})
    if is_main_process():
        save_retrain_json(config, config_file)
    log.info(f"Create quant retrain config file {os.path.realpath(config_file)} success.", "Config")


def _unwrap(model):
    """The module inside DistributedDataParallel; DataParallel is refused with the reason."""
    if isinstance(model, torch.nn.DataParallel):
        raise TypeError(DATA_PARALLEL_UNSUPPORTED)
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _write_record_after_eval(record_file):
    """Forward hook: after an eval-mode forward that follows training, (rank 0) writes the record file, as AMCT's
    QAT model does on its first eval batch."""
    def hook(module, args, output):
        if module.training:
            module.openamct_record_stale = True
        elif module.openamct_record_stale and qat.initialised(module):
            if is_main_process():
                write_record(record_file, records(module))
            module.openamct_record_stale = False
    return hook


def create_quant_retrain_model(config_file, model, record_file, input_data):
    """The QAT model for `model` (a copy; BN folded with frozen statistics). Train it; wrap it in
    DistributedDataParallel for multi-process training. Its first `batch_num` batches initialise the activation
    ranges (IFMR, averaged over the ranks); an eval-mode forward after training writes `record_file`."""
    amct_log.install()
    model = _unwrap(model)
    info = capture(model, input_data)
    config = load_retrain_json(config_file, known_layers=info.layers)
    qmodel = qat.prepare_retrain(model, config, input_data, info=info)
    if is_main_process():
        write_text(record_file, "")
    qmodel.openamct_record_stale = True
    qmodel.register_forward_hook(_write_record_after_eval(record_file))
    return qmodel


def restore_quant_retrain_model(config_file, model, record_file, input_data, pth_file, state_dict_name=None):
    """The QAT model as `create_quant_retrain_model` builds it from the float `model`, with the weights and
    quantizer state of a checkpoint saved during QAT (`state_dict_name`: the key holding the state dict)."""
    qmodel = create_quant_retrain_model(config_file, model, record_file, input_data)
    checkpoint = torch.load(pth_file, map_location="cpu", weights_only=True)
    if state_dict_name is not None:
        if state_dict_name not in checkpoint:
            raise KeyError(f"{pth_file}: no '{state_dict_name}' in the checkpoint (keys: {sorted(checkpoint)[:8]})")
        checkpoint = checkpoint[state_dict_name]
    state = {key.removeprefix("module."): value for key, value in checkpoint.items()}  # saved from DDP
    missing, unexpected = qmodel.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{pth_file} does not match the QAT model of {config_file}: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]} (was it saved from this model and config?)")
    return qmodel


def save_quant_retrain_model(config_file, model, record_file, save_path, input_data, input_names=None,
                             output_names=None, dynamic_axes=None):
    """Write `<save_path>_deploy_model.onnx` and `<save_path>_fake_quant_model.onnx` from the trained QAT model
    (rank 0 only), update `record_file`, and check parity. The model's train/eval mode is left as it was."""
    qmodel = _unwrap(model)
    if not qat.initialised(qmodel):
        raise RuntimeError("save_quant_retrain_model: the model has not been trained yet (the activation ranges "
                           "are initialised on its first batch_num batches)")
    if not is_main_process():
        return None
    amct_log.install()
    was_training = qmodel.training
    qmodel.eval()
    try:
        with torch.no_grad():  # an eval batch turns the learned ranges into the scales and offsets the record holds
            qmodel(*(input_data if isinstance(input_data, tuple) else (input_data,)))
        write_record(record_file, records(qmodel))
        return export(qmodel, save_path, input_data, input_names=input_names, output_names=output_names,
                      dynamic_axes=dynamic_axes)
    finally:
        qmodel.train(was_training)


__all__ = ["create_quant_config", "quantize_preprocess", "quantize_model", "save_model", "create_quant_retrain_config",
           "create_quant_retrain_model", "restore_quant_retrain_model", "save_quant_retrain_model"]
