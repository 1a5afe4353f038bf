"""AMCT's post-training calls (spec 2.1): create_quant_config, quantize_model, save_model."""
import os
import weakref

import torch

from ..core import log
from ..core.algorithms import nuq
from ..core.api import convert, default_config, is_calibrated, prepare, quant_layers, records
from ..core.capture import capture
from ..core.config import NUQ_TYPES, ConfigError, LayerConfig, QuantConfig
from ..core.fileio import write_bytes, write_text
from ..onnx_export import write_models
from ..onnx_export.fused import fused_model, read_fused
from . import amct_log
from .atc_mapping import flagged_names
from .config_files import config_from_cfg, load_json, parse_cfg, save_json
from .preprocess import prepare_balanced
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
