"""Bias correction (Nagel et al. 2019): weight quantization shifts each output channel's mean by
(W_q - W) . E[x]; subtracting that shift from the bias keeps it from compounding through the network."""
import torch
from torch import nn


def correct_bias(layer: nn.Module, quantized: torch.Tensor, original: torch.Tensor,
                 mean_per_weight: torch.Tensor) -> None:
    """Subtract from `layer`'s bias (created if it has none) the output-mean shift of its weight going from
    `original` to `quantized`; `mean_per_weight` is the mean of each input channel laid out as the weight's
    [out, in per group] (output channels first)."""
    with torch.no_grad():
        error = (quantized - original).reshape(original.shape[0], original.shape[1], -1).sum(2)
        shift = (error * mean_per_weight).sum(1)
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros_like(shift))
        layer.bias -= shift
