"""DMQ balancing (AMCT's dmq_balancer; SmoothQuant, Xiao et al. 2023): activation outliers moved into the weights.

A few input channels of a transformer's Linear layers carry values tens of times larger than the rest; one
per-tensor activation scale must cover them and leaves the other channels a handful of integer levels. Per input
channel j, with max|X_j| over the calibration batches and max|W_:,j| over the weights that channel meets,

    s_j = max|X_j|^a / max|W_:,j|^(1-a)        (a: the migration strength)
    X' = X / s,   W' = W * s                    (the layer's output is unchanged)

spreads each channel's range between the activations (a) and the weights (1-a), where per-output-channel weight
scales absorb much of it.

Where the division by s lives: a Mul by 1/s on the layer's own input, in the simulation (QuantLayer.balance_input)
and in the exported models (onnx_export/qdq.py), as AMCT's deploy model has it. Folding 1/s into the producer (a
LayerNorm's affine, the previous Linear's rows) would save that Mul, but AMCT's record holds one factor vector
per consuming layer, and a tensor read by several layers (a transformer's q, k and v) would need several; the
per-consumer Mul is correct on every graph. Grouped and depthwise convs balance each input channel against the
weights of its own group (for a depthwise conv that is one output channel, whose per-channel weight scale takes
all of s, so the weights lose nothing).
"""
import torch
from torch import nn

TINY = float(torch.finfo(torch.float32).eps)  # maxima below this: a channel with nothing to balance (factor 1)


def _input_axis_first(layer: nn.Module) -> bool:
    """ConvTranspose stores its weight [in, out per group, ...]; Linear and Conv store [out, in per group, ...]."""
    return isinstance(layer, nn.modules.conv._ConvTransposeNd)


def input_channel_max(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """max|x| of each input channel of `layer` in one batch (Linear: the last dim; convs: dim 1)."""
    channel = x.dim() - 1 if isinstance(layer, nn.Linear) else 1
    return x.detach().abs().amax(dim=[d for d in range(x.dim()) if d != channel]).float()


def weight_channel_max(layer: nn.Module) -> torch.Tensor:
    """max|W| over the weights each input channel meets (its own group's, in a grouped conv)."""
    weight = layer.weight.detach().abs().float()
    if _input_axis_first(layer):
        return weight.flatten(1).amax(1)
    groups = getattr(layer, "groups", 1)
    return weight.reshape(groups, weight.shape[0] // groups, weight.shape[1], -1).amax(dim=(1, 3)).reshape(-1)


def balance_factors(act_max: torch.Tensor, weight_max: torch.Tensor, strength: float) -> torch.Tensor:
    """s = act_max^strength / weight_max^(1-strength) per input channel (float32), 1 where the activations or the
    weights of a channel are all (nearly) zero: there is nothing to move, and a huge or tiny factor would only
    put the other side's rounding noise out of range."""
    act, weight = act_max.double(), weight_max.double()
    factors = act.pow(strength) / weight.pow(1 - strength)
    usable = (act > TINY) & (weight > TINY) & torch.isfinite(factors)
    factors = torch.where(usable, factors, torch.ones_like(factors)).clamp(TINY, 1 / TINY)
    return factors.float()


def inverse_view(layer: nn.Module, factors: torch.Tensor) -> torch.Tensor:
    """1 / factors in float32 (through float64, so the exported models compute the very same numbers), shaped to
    multiply the layer's input: [C] for Linear (last dim), [C, 1, ...] for a conv's channel dim."""
    inverse = (1 / factors.double()).float()
    return inverse.reshape((-1,) + (1,) * (layer.weight.dim() - 2))


def scale_weight(layer: nn.Module, factors: torch.Tensor) -> None:
    """W *= s along the input channels, in place (the layer then reads X / s)."""
    weight = layer.weight
    factors = factors.to(weight)
    if _input_axis_first(layer):
        per_weight = factors.reshape((-1,) + (1,) * (weight.dim() - 1))
    else:
        groups, out, per_group = getattr(layer, "groups", 1), weight.shape[0], weight.shape[1]
        per_weight = factors.reshape(groups, 1, per_group).expand(groups, out // groups, per_group)
        per_weight = per_weight.reshape((out, per_group) + (1,) * (weight.dim() - 2))
    with torch.no_grad():
        weight.mul_(per_weight)


class InputRange:
    """The running max|x| of each input channel of `layer` over the batches it has seen."""

    def __init__(self, layer: nn.Module):
        self.layer = layer
        self.max = None

    def observe(self, x: torch.Tensor) -> None:
        batch_max = input_channel_max(self.layer, x)
        self.max = batch_max if self.max is None else torch.maximum(self.max, batch_max)

    def factors(self, strength: float) -> torch.Tensor:
        return balance_factors(self.max.cpu(), weight_channel_max(self.layer).cpu(), strength)
