"""The quantized layer of a calibration/simulation model: a float layer plus named quantizer submodules."""
import math

import torch
from torch import nn
from torch.func import functional_call

from .config import LayerConfig
from .observers import OBSERVERS
from .primitives import act_qparams, fake_quant, fake_quant_weight, quantize_bias, weight_scales


class ActQuantizer(nn.Module):
    """Observes inputs while calibrating, then fake-quantizes them with the computed scale/offset."""

    def __init__(self, params, asymmetric: bool, batch_num: int, bounds, layer: str):
        super().__init__()
        self.params, self.asymmetric, self.batch_num, self.layer = params, asymmetric, batch_num, layer
        self.bounds = tuple(bounds) if bounds else (-math.inf, math.inf)
        self.observer = OBSERVERS[params.act_algo](params, asymmetric, batch_num, layer)
        self.batches_seen = 0
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("offset", torch.tensor(0.0))
        self.calibrated = False

    def forward(self, x):
        if self.calibrated:
            return fake_quant(x, self.scale, self.offset, self.params.num_bits)
        if self.batches_seen < self.batch_num:  # AMCT ignores batches beyond batch_num
            self.observer.observe(x)
            self.batches_seen += 1
        return x

    def finish(self) -> None:
        if self.batches_seen == 0:
            raise RuntimeError(f"layer '{self.layer}' saw no calibration batch: is it reached by the forward pass?")
        clip_min, clip_max = self.observer.compute(self.bounds)
        scale, offset = act_qparams(clip_min, clip_max, self.params.num_bits, self.asymmetric)
        self.scale.fill_(scale)
        self.offset.fill_(offset)
        self.observer = None  # frees the statistics
        self.calibrated = True

    def extra_repr(self):
        state = f"scale={self.scale.item():.6g}, offset={int(self.offset)}" if self.calibrated else "observing"
        return f"{self.params.act_algo}, bits={self.params.num_bits}, asymmetric={self.asymmetric}, {state}"


class WeightQuantizer(nn.Module):
    """ARQ: symmetric per-channel (or per-tensor) scales from the weight's own range."""

    def __init__(self, params, axis: int):
        super().__init__()
        self.params, self.axis = params, axis

    def scales(self, weight: torch.Tensor) -> torch.Tensor:
        return weight_scales(weight, self.params.num_bits, self.params.channel_wise, self.axis)

    def forward(self, weight):
        return fake_quant_weight(weight, self.scales(weight).to(weight.device), self.params.num_bits, self.axis)

    def extra_repr(self):
        return f"arq, bits={self.params.num_bits}, channel_wise={self.params.channel_wise}"


class QuantLayer(nn.Module):
    """`layer` (BN already folded) run on fake-quantized input and weights through its own forward."""

    def __init__(self, layer: nn.Module, config: LayerConfig, asymmetric: bool, batch_num: int, bounds, name: str,
                 axis: int):
        super().__init__()
        self.layer, self.name, self.axis = layer, name, axis
        self.input_quantizer = ActQuantizer(config.activation, asymmetric, batch_num, bounds, name)
        self.weight_quantizer = WeightQuantizer(config.weight, axis)

    def forward(self, x):
        x = self.input_quantizer(x)
        weight = self.weight_quantizer(self.layer.weight)
        bias = self.layer.bias
        if bias is not None and self.input_quantizer.calibrated:
            # the deployed model adds the bias in INT32 on the accumulator grid: simulate that rounding too
            grid = self.input_quantizer.scale * self.weight_quantizer.scales(self.layer.weight).to(bias.device)
            bias = bias + (quantize_bias(bias, grid) * grid - bias).detach()
        return functional_call(self.layer, {"weight": weight, "bias": bias}, (x,))

    def record(self) -> dict:
        """This layer's entry of the record file."""
        scale_w = self.weight_quantizer.scales(self.layer.weight).cpu()
        return {"scale_d": float(self.input_quantizer.scale), "offset_d": int(self.input_quantizer.offset),
                "scale_w": scale_w.tolist(), "offset_w": [0] * scale_w.numel()}
