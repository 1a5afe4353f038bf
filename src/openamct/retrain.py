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
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .api import prepare, quant_layers, quantize
from .config import RetrainConfig
from .fileio import is_main_process
from .modules import QuantLayer, WeightQuantizer, requantize, shared_quantized
from .observers import IFMRObserver
from .primitives import (FLT_EPSILON, act_qparams, channel_rows, fake_quant, fake_quant_weight, qrange,
                         round_ste)


class ULQActQuantizer(nn.Module):
    """An activation quantizer with a learned clip range (AMCT's ULQ).

    Training forward: scale = (clip_max - clip_min) / (2^b - 1), offset = round(qmin - clip_min / scale) (rounded
    with a straight-through gradient), then fake quantization. Autograd through this gives AMCT's ULQ gradients:
    inside the range, d/d clip_max = (round(x/s) - x/s) / (2^b - 1) and d/d clip_min its negative; above the range
    d/d clip_max = 1, below it d/d clip_min = 1; the input's gradient is straight-through inside, zero outside.
    """

    def __init__(self, params, batch_num: int, bounds, layer: str, data):
        super().__init__()
        self.params, self.batch_num, self.layer = params, batch_num, layer
        self.asymmetric = True
        self.bounds = tuple(bounds) if bounds else (-math.inf, math.inf)
        self.fixed_min = data.fixed_min if data.fixed_min is not None else self.bounds[0] >= 0
        given = data.clip_max is not None
        self.clip_max = nn.Parameter(torch.tensor(float(data.clip_max) if given else 1.0))
        self.clip_min = nn.Parameter(torch.tensor(float(data.clip_min) if given and not self.fixed_min else 0.0),
                                     requires_grad=not self.fixed_min)
        self.register_buffer("initialized", torch.tensor(given))
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("offset", torch.tensor(0.0))
        self.observer = None if given else IFMRObserver(params, True, batch_num, layer)
        self.batches_seen = 0

    @property
    def calibrated(self) -> bool:
        """In eval mode once initialised the layers compute as the deployed model does (see QuantLayer)."""
        return bool(self.initialized) and not self.training

    def clip_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The learned range, guarded so that it never collapses or changes sign, and within the range its
        producer guarantees (ReLU6: 0..6): codes beyond it are never used, and a range a rounding error above 6
        keeps the Clip in the deployed graph (ORT 1.30 then fails to load the model: two nodes named alike)."""
        clip_max = self.clip_max.clamp(min=1e-4, max=max(self.bounds[1], 1e-4))
        clip_min = torch.zeros_like(clip_max) if self.fixed_min else self.clip_min.clamp(min=self.bounds[0], max=0.0)
        return clip_min, clip_max

    def forward(self, x):
        if not self.initialized:
            return shared_quantized(x, self._initialising)
        if self.training:
            return shared_quantized(x, self._learned)
        with torch.no_grad():
            scale, offset = act_qparams(*self.clip_range(), self.params.num_bits, True)
            self.scale.fill_(scale)
            self.offset.fill_(offset)
        return shared_quantized(x, lambda v: requantize(v, self.scale, self.offset, self.params.num_bits))

    def _learned(self, x):
        qmin, qmax = qrange(self.params.num_bits)
        clip_min, clip_max = self.clip_range()
        scale = (clip_max - clip_min) / (qmax - qmin)
        return fake_quant(x, scale, round_ste(qmin - clip_min / scale), self.params.num_bits)

    def _initialising(self, x):
        """IFMR observes the first batch_num batches; meanwhile each batch is quantized to its own min/max."""
        self.observer.observe(x)
        self.batches_seen += 1
        lo, hi = (float(v) for v in torch.aminmax(x.detach()))
        scale, offset = act_qparams(0.0 if self.fixed_min else lo, hi, self.params.num_bits, True)
        out = fake_quant(x, scale, offset, self.params.num_bits)
        if self.batches_seen >= self.batch_num:
            self._initialise()
        return out + 0.0 * (self.clip_max + self.clip_min)  # DDP: every trained parameter takes part in each step

    def _initialise(self) -> None:
        clip = torch.tensor(self.observer.compute(self.bounds), dtype=torch.float64, device=self.clip_max.device)
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world > 1:  # every rank starts from the same range: the mean of the ranks' IFMR results
            dist.all_reduce(clip)
            clip /= world
        with torch.no_grad():
            self.clip_min.fill_(float(clip[0]))
            self.clip_max.fill_(float(clip[1]))
            self.initialized.fill_(True)
        self.observer = None

    def extra_repr(self):
        state = f"clip=[{self.clip_min.item():.4g}, {self.clip_max.item():.4g}]" if self.initialized else \
            f"initialising ({self.batches_seen}/{self.batch_num} batches)"
        return f"ulq, bits={self.params.num_bits}, fixed_min={self.fixed_min}, {state}"


def least_error_scales(weight: torch.Tensor, num_bits: int, channel_wise: bool, axis: int,
                       ratios: torch.Tensor = torch.linspace(0.3, 1.0, 71)) -> torch.Tensor:
    """Per channel (or tensor), the fraction of the max-abs scale with the least squared quantization error."""
    w = channel_rows(weight, channel_wise, axis)
    qmin, qmax = qrange(num_bits)
    full = w.abs().amax(1) / qmax
    full = torch.where(full < FLT_EPSILON, torch.ones_like(full), full)  # all-zero channels: scale 1, as ARQ
    best, best_error = full.clone(), torch.full_like(full, math.inf)
    for ratio in ratios.tolist():
        scale = full * ratio
        error = ((torch.clamp(torch.round(w / scale[:, None]), qmin, qmax) * scale[:, None] - w) ** 2).sum(1)
        better = error < best_error
        best, best_error = torch.where(better, scale, best), torch.minimum(error, best_error)
    return best


class LearnedWeightQuantizer(WeightQuantizer):
    """ulq_retrain: the per-channel (or per-tensor) scale is learned; fake_quant's straight-through rounding gives
    it the LSQ gradient (round(w/s) - w/s inside the range, the range end outside). It is learned as its logarithm:
    an optimizer step then changes every channel's scale by a similar fraction, whether it is 1e-4 or 1."""

    def __init__(self, params, axis: int, weight: torch.Tensor):
        super().__init__(params, axis)
        self.log_scale = nn.Parameter(least_error_scales(weight, params.num_bits, params.channel_wise, axis).log())

    def scales(self, weight: torch.Tensor) -> torch.Tensor:
        return self.log_scale.exp()

    def forward(self, weight):
        return fake_quant_weight(weight, self.scales(weight), self.params.num_bits, self.axis)

    def extra_repr(self):
        return f"ulq_retrain, bits={self.params.num_bits}, channel_wise={self.params.channel_wise}"


class RetrainLayer(QuantLayer):
    """A QuantLayer whose quantizers learn; no calibration statistics (GPTQ, bias correction) are collected."""

    collects_statistics = False

    def __init__(self, layer, config, input_quantizer, name, axis, output_quantizer, weight_algo: str):
        super().__init__(layer, config, input_quantizer, name, axis, output_quantizer)
        if weight_algo == "ulq_retrain":
            self.weight_quantizer = LearnedWeightQuantizer(config.weight, axis, layer.weight)


def prepare_retrain(model: nn.Module, config: RetrainConfig, input_data) -> nn.Module:
    """The QAT copy of `model` (BN folded with frozen statistics, learned quantizers), in `model`'s train/eval mode."""
    quant_config = config.quant_config()

    def make_quantizer(name, bounds):
        return ULQActQuantizer(quant_config.layers[name].activation, config.batch_num, bounds, name,
                               config.layers[name].data)

    def make_layer(layer, name, input_quantizer, axis, output_quantizer):
        return RetrainLayer(layer, quant_config.layers[name], input_quantizer, name, axis, output_quantizer,
                            config.layers[name].weight.algo)

    qmodel = prepare(model, quant_config, input_data, make_quantizer=make_quantizer, make_layer=make_layer)
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


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      weight: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """(1 - weight) * cross-entropy on the labels + weight * T^2 * KL(teacher || student) on softened logits
    (Hinton et al. 2015): the FP32 model's outputs carry far more information per image than a label."""
    hard = F.cross_entropy(logits, labels)
    if weight == 0:
        return hard
    soft = F.kl_div(F.log_softmax(logits / temperature, 1), F.log_softmax(teacher_logits / temperature, 1),
                    reduction="batchmean", log_target=True) * temperature ** 2
    return (1 - weight) * hard + weight * soft


def _loss(logits, teacher_logits, labels, kd_weight: float, temperature: float) -> torch.Tensor:
    if teacher_logits is None:
        return F.cross_entropy(logits, labels)
    return distillation_loss(logits, teacher_logits, labels, kd_weight, temperature)


def train(model: nn.Module, loader, steps: int, optimizer, *, scheduler=None, teacher: nn.Module | None = None,
          kd_weight: float = 0.0, temperature: float = 1.0, mixup: float = 0.0, device=None, print_freq: int = 0,
          log_fn=print) -> list[float]:
    """Run `steps` optimizer steps over `loader` (cycled), with optional distillation from `teacher`; a progress
    bar on rank 0 shows the loss and learning rate. Returns the loss of each step.

    `mixup` > 0 trains on each batch blended with its reverse, lam * x + (1 - lam) * x[::-1], lam ~ Beta(mixup,
    mixup); the label loss is blended alike and the teacher labels the blended images, so a few hundred images
    give many distinct targets (Beyer et al. 2022, "Knowledge distillation: a good teacher is patient and
    consistent")."""
    if not mixup >= 0:
        raise ValueError(f"mixup: expected alpha >= 0 (0: off), got {mixup}")
    blend = torch.distributions.Beta(mixup, mixup) if mixup > 0 else None
    model.train()
    if teacher is not None:
        teacher.eval()
    losses, step, epoch = [], 0, 0
    bar = tqdm(total=steps, desc="retrain", unit="step", disable=not is_main_process())
    while step < steps:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        epoch += 1
        for images, labels in loader:
            if device is not None:
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            lam = float(blend.sample()) if blend is not None else 1.0
            if lam < 1.0:
                images = lam * images + (1 - lam) * images.flip(0)
            logits, teacher_logits = model(images), None
            if teacher is not None and kd_weight > 0:
                with torch.no_grad():
                    teacher_logits = teacher(images)
            loss = _loss(logits, teacher_logits, labels, kd_weight, temperature)
            if lam < 1.0:  # the label loss blended as the images were
                loss = lam * loss + (1 - lam) * _loss(logits, teacher_logits, labels.flip(0), kd_weight, temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            losses.append(loss.item())
            step += 1
            lr = optimizer.param_groups[0]["lr"]
            bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr:.3g}")
            bar.update()
            if print_freq and step % print_freq == 0 and is_main_process():
                log_fn(f"step {step}/{steps}: loss {losses[-1]:.4f}, lr {lr:.3g}")
            if step >= steps:
                break
    bar.close()
    return losses


__all__ = ["ULQActQuantizer", "LearnedWeightQuantizer", "RetrainLayer", "prepare_retrain", "start_from",
           "start_from_ptq", "parameter_groups", "distillation_loss", "train", "initialised"]
