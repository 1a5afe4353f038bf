"""GPTQ (Frantar et al. 2023): weights on the quantizer's grid chosen column by column, each column's rounding
error pushed onto the columns not yet quantized through the inverse Hessian E[x x^T] of the layer's input, so the
layer's output error on the calibration data, not the weight error, is what is minimised.

The Hessian is accumulated from what the layer's kernel actually reads: `KernelInput` records the input (and
padding) of the conv2d call inside the layer's forward, so a conv that pads in its forward (TF "same" padding,
padding computed at run time) gets the statistics of its padded input without the core knowing its class.
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..primitives import qrange

_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


class KernelInput(TorchFunctionMode):
    """While active: the input and arguments of the first conv2d call (`input`, `padding`, ...), or None."""

    def __init__(self):
        super().__init__()
        self.call = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.call is None and getattr(func, "__name__", "") == "conv2d":
            self.call = dict(zip(_CONV_ARGS, args)) | kwargs
        return func(*args, **kwargs)


def _patches(x: torch.Tensor, layer: nn.Conv2d, padding) -> torch.Tensor:
    """F.unfold of the conv kernel's input `x` with the call's `padding`: [N, C * kh * kw, L]."""
    if padding == "valid":
        padding = 0
    elif padding == "same":  # stride 1 (PyTorch's rule): the extra pixel goes after
        total = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size)]
        x = F.pad(x, [p for t in reversed(total) for p in (t // 2, t - t // 2)])
        padding = 0
    return F.unfold(x, layer.kernel_size, layer.dilation, padding, layer.stride)


def is_depthwise(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Conv2d) and 1 < layer.groups == layer.in_channels == layer.out_channels


def supported(layer: nn.Module) -> bool:
    """GPTQ runs on Linear, Conv2d with groups 1, and depthwise Conv2d (each channel a layer of its own)."""
    return isinstance(layer, nn.Linear) or (isinstance(layer, nn.Conv2d) and layer.groups == 1) or is_depthwise(layer)


def hessian(layer: nn.Module, x: torch.Tensor, call: dict | None) -> torch.Tensor | None:
    """GPTQ's E[x x^T] over the weight's columns for one batch, for Linear and Conv2d with groups 1: [K, K]; for a
    depthwise Conv2d, one [kh * kw, kh * kw] per channel: [C, K, K]. `x` is the layer's input and `call` the
    conv2d call its forward made (KernelInput). None for the layers GPTQ does not support."""
    if isinstance(layer, nn.Linear):
        rows = x.reshape(-1, x.shape[-1])
    elif not supported(layer) or call is None:
        return None
    else:
        taps = layer.kernel_size[0] * layer.kernel_size[1]
        chunk = max(1, 2 ** 24 // (x[0].numel() * taps))  # bounded memory for a depthwise conv's patches
        x, padding = call["input"].detach().float(), call.get("padding", 0)
        if layer.groups == 1:
            if layer.kernel_size == (1, 1) and layer.stride == (1, 1) and padding in (0, (0, 0), "valid"):
                rows = x.transpose(0, 1).reshape(x.shape[1], -1).t()
            else:
                patches = _patches(x, layer, padding)
                rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        else:
            channels, total, count = x.shape[1], 0.0, 0
            for part in x.split(chunk):
                patches = _patches(part, layer, padding).reshape(part.shape[0], channels, taps, -1)
                total = total + torch.einsum("ncil,ncjl->cij", patches, patches)
                count += part.shape[0] * patches.shape[-1]
            return total / count
    return rows.t() @ rows / rows.shape[0]


def _column_quantizer(weight: torch.Tensor, quantizer, device):
    """column (one value per output channel) -> its dequantized value on the quantizer's grid (and codebook)."""
    scale = quantizer.scales(weight).double().to(device).expand(weight.shape[0])
    table = quantizer.table.to(device).double() if quantizer.table is not None else None
    rows = torch.arange(weight.shape[0], device=device) if table is not None and table.shape[0] > 1 else \
        torch.zeros(weight.shape[0], dtype=torch.long, device=device)
    qmin, qmax = qrange(quantizer.params.num_bits)

    def quantize_column(column):
        codes = torch.clamp(torch.round(column / scale), qmin, qmax)
        if table is not None:
            codes = table[rows, codes.long() + 128]
        return codes * scale
    return quantize_column


def _damped(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """hessian (float64, [..., K, K]) with damp * mean diagonal added, and 1 on the diagonal of inputs that were
    always 0: their weights are then rounded to nearest and kept (not zeroed: other data may reach them)."""
    h = hessian.double().clone()
    diagonal = torch.diagonal(h, dim1=-2, dim2=-1)
    diagonal[diagonal == 0] = 1.0
    diagonal += damp * diagonal.mean(-1, keepdim=True)
    return h


def ridged(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """hessian (float64, [K, K]) with damp * mean diagonal added to its diagonal: the output-error metric that NUQ's
    level refits and the choice between their rounds share."""
    h = hessian.double()
    return h + damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)


def _extremes(w: torch.Tensor, channel_wise: bool) -> torch.Tensor:
    """Mask of the weights that set the ARQ scale (largest magnitude per row, or in the tensor). GPTQ leaves them
    as they are, so the scale recomputed from its weights is the one it used: QAT's arq_retrain, which recomputes
    the range at every step, then starts from exactly the PTQ model."""
    magnitude = w.abs()
    return magnitude == (magnitude.amax(1, keepdim=True) if channel_wise else magnitude.max())


def gptq(weight: torch.Tensor, hessian: torch.Tensor, quantizer, block: int = 128,
         damp: float = 0.01) -> torch.Tensor:
    """Weights on the quantizer's grid chosen column by column, each column's error pushed onto the columns not
    yet quantized through the inverse Hessian E[x x^T] (Frantar et al. 2023, GPTQ): the layer's output error on
    the calibration data, not the weight error, is what is minimised. Returns dequantized weights."""
    shape = weight.shape
    w = weight.detach().double().reshape(shape[0], -1).clone()
    h = _damped(hessian.to(w.device), damp)
    order = torch.argsort(torch.diag(h), descending=True)  # the columns that matter most go first
    w, h = w[:, order], h[order][:, order]
    kept, original = _extremes(w, quantizer.params.channel_wise), w.clone()
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    quantize_column = _column_quantizer(weight, quantizer, w.device)
    out = torch.zeros_like(w)
    for start in range(0, w.shape[1], block):
        end = min(start + block, w.shape[1])
        w1, errors = w[:, start:end].clone(), torch.zeros(w.shape[0], end - start, dtype=w.dtype, device=w.device)
        for k in range(end - start):
            q = quantize_column(w1[:, k])
            out[:, start + k] = q
            error = (w1[:, k] - q) / upper[start + k, start + k]
            w1[:, k:] -= error[:, None] * upper[start + k, start:end][None, k:]
            w1 = torch.where(kept[:, start:end], original[:, start:end], w1)
            errors[:, k] = error
        w[:, end:] -= errors @ upper[start:end, end:]
        w = torch.where(kept, original, w)
    return out[:, torch.argsort(order)].reshape(shape).to(weight.dtype)


def gptq_depthwise(weight: torch.Tensor, hessians: torch.Tensor, quantizer,
                   damp: float = 0.01) -> torch.Tensor:
    """GPTQ for a depthwise conv: each output channel is a layer of its own, its kh * kw weights seeing only its
    input channel's patches, so every channel has its own Hessian ([C, K, K]) and all channels run as a batch."""
    shape = weight.shape
    w = weight.detach().double().reshape(shape[0], -1).clone()
    h = _damped(hessians.to(w.device), damp)
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    quantize_column = _column_quantizer(weight, quantizer, w.device)
    kept, original = _extremes(w, quantizer.params.channel_wise), w.clone()
    out = torch.zeros_like(w)
    for k in range(w.shape[1]):
        out[:, k] = quantize_column(w[:, k])
        error = (w[:, k] - out[:, k]) / upper[:, k, k]
        w[:, k:] -= error[:, None] * upper[:, k, k:]
        w = torch.where(kept, original, w)
    return out.reshape(shape).to(weight.dtype)
