"""AMCT's quantization-aware training calls (spec 2.2): create_quant_retrain_config, create_quant_retrain_model,
restore_quant_retrain_model, save_quant_retrain_model."""
import os

import torch

from ..core import log, qat
from ..core.api import records
from ..core.capture import capture
from ..core.config import RetrainConfig, RetrainLayerConfig
from ..core.fileio import is_main_process, write_text
from ..core.simulation import DATA_PARALLEL_UNSUPPORTED
from ..onnx_export import export
from . import amct_log
from .config_files import load_retrain_json, retrain_config_from_cfg, save_retrain_json
from .record import write_record


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
