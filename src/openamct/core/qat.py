"""Quantization-aware training (AMCT's "retrain", spec 2.2 and 4.6): learned quantizers, straight-through gradients.

The QAT model is built like the PTQ calibration model (api.prepare): one activation quantizer per tensor shared
by all its consumers, each quantizable layer wrapped. What differs is that the quantizers learn:
- activations (ULQ): a clip range [clip_min, clip_max] learned by gradient; it starts from IFMR run on the first
  `batch_num` batches (each batch's own min/max serves until then), averaged over the ranks under DDP;
- weights: `arq_retrain` recomputes the symmetric range from the weights at every step; `ulq_retrain` learns the
  scale (initialised at the scale of least squared weight error, which matters at 4 bits).

BN is folded into the convs when the QAT model is created, with its running statistics frozen, rather than kept
during training and folded at save time as AMCT does: with a few hundred images the batch statistics would only get
noisier, and the model that trains is then exactly the model that is exported (no save-time re-fold that moves the
weights under their learned ranges).

In eval mode (once initialised) the model is the simulation of the deployed model, as after PTQ calibration, and
its quantization parameters are what the record file and the exported ONNX models hold.
"""
import dataclasses

import torch
from torch import nn

from .api import prepare, quant_layers, quantize
from .capture import capture, layer_groups
from .config import RetrainConfig, RetrainLayerConfig, apply_rules
from .layer import QuantLayer
from .primitives import qrange
from .quantizers import LearnedWeightQuantizer, ULQActQuantizer


class RetrainLayer(QuantLayer):
    """A QuantLayer whose quantizers learn; no calibration statistics (GPTQ, bias correction) are collected."""

    collects_statistics = False

    def __init__(self, layer, config, input_quantizer, name, axis, output_quantizer, weight_algo: str):
        super().__init__(layer, config, input_quantizer, name, axis, output_quantizer)
        if weight_algo == "ulq_retrain":
            self.weight_quantizer = LearnedWeightQuantizer(config.weight, axis, layer.weight)


def retrain_config(model: nn.Module, input_data, *, rules=(), batch_num: int = 1) -> RetrainConfig:
    """The QAT config of `model`: ULQ activations and per-channel arq_retrain INT8 weights on every quantizable
    layer, changed by `rules` (config.Rule, on RetrainLayerConfig fields: retrain_enable, data, weight)."""
    info = capture(model, input_data)
    return RetrainConfig(layers=apply_rules(RetrainLayerConfig(), rules, info.layers, layer_groups(info)),
                         batch_num=batch_num)


def prepare_retrain(model: nn.Module, config: RetrainConfig, input_data, *, info=None) -> nn.Module:
    """The QAT copy of `model` (BN folded with frozen statistics, learned quantizers), in `model`'s train/eval mode."""
    quant_config = config.quant_config()

    def make_quantizer(name, bounds):
        return ULQActQuantizer(quant_config.layers[name].activation, config.batch_num, bounds, name,
                               config.layers[name].data)

    def make_layer(layer, name, input_quantizer, axis, output_quantizer):
        return RetrainLayer(layer, quant_config.layers[name], input_quantizer, name, axis, output_quantizer,
                            config.layers[name].weight.algo)

    qmodel = prepare(model, quant_config, input_data, info=info, make_quantizer=make_quantizer, make_layer=make_layer)
    return qmodel.train(model.training)


def start_from(qmodel: nn.Module, calibrated: nn.Module) -> nn.Module:
    """Start QAT from a calibrated PTQ model of the same float model and bit widths (e.g. GPTQ rounding and bias
    correction): its weights, biases and weight scales, and its activation ranges as the initial clips. With few
    images, refining a good PTQ solution generalises better than training from the float weights. Call it before
    creating the optimizer (a layer may gain a bias)."""
    sources = quant_layers(calibrated)
    for name, layer in quant_layers(qmodel).items():
        if name not in sources:
            raise KeyError(f"start_from: layer '{name}' is not quantized in the calibrated model")
        source = sources[name]
        with torch.no_grad():
            layer.layer.weight.copy_(source.layer.weight)
            if source.layer.bias is not None and layer.layer.bias is None:
                layer.layer.bias = nn.Parameter(source.layer.bias.detach().clone())
            elif source.layer.bias is not None:
                layer.layer.bias.copy_(source.layer.bias)
            if isinstance(layer.weight_quantizer, LearnedWeightQuantizer):
                layer.weight_quantizer.log_scale.copy_(source.weight_quantizer.scales(source.layer.weight).log())
            for mine, theirs in ((layer.input_quantizer, source.input_quantizer),
                                 (layer.output_quantizer, source.output_quantizer)):
                if mine is not None and theirs is not None and not mine.initialized:
                    qmin, qmax = qrange(theirs.params.num_bits)
                    scale, offset = float(theirs.scale), float(theirs.offset)
                    mine.clip_min.fill_(min(0.0, (qmin - offset) * scale))
                    mine.clip_max.fill_((qmax - offset) * scale)
                    mine.initialized.fill_(True)
                    mine.observer = None
    return qmodel


def start_from_ptq(qmodel: nn.Module, model: nn.Module, config: RetrainConfig, calibrate_fn, input_data,
                   batch_num: int | None = None):
    """`start_from` a PTQ calibration of the float `model` at the QAT config's bit widths, with GPTQ rounding and
    bias correction; `calibrate_fn(m)` runs `batch_num` (default: the config's) batches through `m`."""
    quant = dataclasses.replace(config.quant_config(), batch_num=batch_num or config.batch_num)
    layers = {name: dataclasses.replace(layer, weight=dataclasses.replace(layer.weight, rounding="gptq",
                                                                        bias_correction=True))
              for name, layer in quant.layers.items()}
    return start_from(qmodel, quantize(model, dataclasses.replace(quant, layers=layers), calibrate_fn, input_data))


def initialised(qmodel: nn.Module) -> bool:
    quantizers = [m for m in qmodel.modules() if isinstance(m, ULQActQuantizer)]
    return bool(quantizers) and all(bool(q.initialized) for q in quantizers)


def parameter_groups(qmodel: nn.Module, weight_decay: float = 1e-4) -> list[dict]:
    """Optimizer groups: the model's weights with weight decay, the quantizers' ranges and scales without it
    (decay would shrink the learned ranges towards zero)."""
    quant, rest = [], []
    for name, parameter in qmodel.named_parameters():
        if parameter.requires_grad:
            leaf = name.rsplit(".", 1)[-1]
            (quant if leaf in ("clip_max", "clip_min", "log_scale") else rest).append(parameter)
    return [{"params": rest, "weight_decay": weight_decay}, {"params": quant, "weight_decay": 0.0}]
