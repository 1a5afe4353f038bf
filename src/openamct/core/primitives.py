"""Pure tensor functions: AMCT's quantization parameters and fake quantization (spec 4.1).

Convention (AMCT): q = clamp(round(x / scale) + offset, -2^(b-1), 2^(b-1) - 1), x ~ (q - offset) * scale.
round is half-to-even, as in ONNX QuantizeLinear, so PyTorch and ONNX Runtime agree.
"""
import math

import torch

from .config import InputError

FLT_EPSILON = 1.1920929e-07


def qrange(num_bits: int) -> tuple[int, int]:
    return -(2 ** (num_bits - 1)), 2 ** (num_bits - 1) - 1


def range_implies_clip(scale, offset, num_bits: int, low: float, high: float) -> bool:
    """Whether quantizing with (scale, offset) already clips to [low, high], so that a clip before it changes
    nothing: ONNX Runtime's test (ClipQuantFusion) for dropping the clip and requantizing the accumulator."""
    qmin, qmax = qrange(num_bits)
    scale = torch.tensor(float(scale), dtype=torch.float32)
    return low - float(scale * float(qmin - offset)) <= FLT_EPSILON and \
        float(scale * float(qmax - offset)) - high <= FLT_EPSILON


def act_qparams(clip_min: float, clip_max: float, num_bits: int = 8, asymmetric: bool = True) -> tuple[float, int]:
    """Scale and offset for an activation range.

    >>> act_qparams(0.0, 5.1)
    (0.019999999552965164, -128)
    >>> act_qparams(-1.0, 0.5, asymmetric=False)
    (0.0078125, 0)
    """
    qmin, qmax = qrange(num_bits)
    lo, hi = min(float(clip_min), 0.0), max(float(clip_max), 0.0)
    if asymmetric:
        scale = (hi - lo) / (qmax - qmin)
        if scale < FLT_EPSILON:
            return 1.0, qmin
        scale = float(torch.tensor(scale, dtype=torch.float32))
        offset = int(round(qmin - lo / scale))
        return scale, max(qmin, min(qmax, offset))
    bound = max(abs(lo), abs(hi))
    levels = -qmin if abs(lo) > abs(hi) else qmax
    scale = bound / levels
    if scale < FLT_EPSILON:
        return 1.0, 0
    return float(torch.tensor(scale, dtype=torch.float32)), 0


def channel_rows(weight: torch.Tensor, channel_wise: bool, axis: int) -> torch.Tensor:
    """The weight (detached, float32) as one row per output channel (along `axis`), or as a single row."""
    w = weight.detach().float()
    return w.transpose(0, axis).reshape(w.shape[axis], -1) if channel_wise else w.reshape(1, -1)


def weight_scales(weight: torch.Tensor, num_bits: int = 8, channel_wise: bool = True, axis: int = 0) -> torch.Tensor:
    """Symmetric ARQ scales, one per output channel (along `axis`) or one for the tensor; float32, 1-D."""
    qmin, qmax = qrange(num_bits)
    w = channel_rows(weight, channel_wise, axis)
    wmax, wmin = w.amax(dim=1).clamp(min=0), w.amin(dim=1).clamp(max=0)
    negative_larger = (-wmin) > wmax
    bound = torch.maximum(wmax, -wmin)
    scale = bound / torch.where(negative_larger, float(-qmin), float(qmax))
    return torch.where(scale < FLT_EPSILON, torch.ones_like(scale), scale)


def straight_through(value: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """`exact` forward, with `value`'s gradient (where one is being taken; else `exact` itself, which is the same
    number: value + (exact - value) rounds back to exact)."""
    if not (torch.is_grad_enabled() and value.requires_grad):
        return exact
    return value + (exact - value).detach()


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() whose gradient passes straight through (for QAT)."""
    return straight_through(x, torch.round(x))


def quantize(x: torch.Tensor, scale, offset, num_bits: int = 8) -> torch.Tensor:
    """Integer codes (as float) of `x`."""
    qmin, qmax = qrange(num_bits)
    return torch.clamp(torch.round(x / scale) + offset, qmin, qmax)


def fake_quant(x: torch.Tensor, scale, offset, num_bits: int = 8) -> torch.Tensor:
    """Quantize then dequantize, with a straight-through gradient for values inside the range."""
    qmin, qmax = qrange(num_bits)
    q = torch.clamp(round_ste(x / scale) + offset, qmin, qmax)
    return (q - offset) * scale


def channel_view(scale: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    """Reshape a per-channel vector so it broadcasts along `axis` of an `ndim` tensor."""
    shape = [1] * ndim
    shape[axis] = -1
    return scale.reshape(shape)


def fake_quant_weight(weight: torch.Tensor, scale: torch.Tensor, num_bits: int = 8, axis: int = 0) -> torch.Tensor:
    s = channel_view(scale, weight.dim(), axis) if scale.numel() > 1 else scale.reshape(())
    return fake_quant(weight, s.to(weight), 0, num_bits)


def quantize_bias(bias: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """INT32 codes (as float) of a bias on the accumulator grid scale_d * scale_w, as ONNX QLinearConv adds it."""
    q = torch.round(bias.detach().float() / grid.float())
    if q.abs().max() > 2 ** 31 - 1:
        raise OverflowError("bias does not fit in INT32 at scale scale_d * scale_w")
    return q


def flat_values(x: torch.Tensor, layer: str) -> torch.Tensor:
    """An observer's batch as flat float data, in its memory order."""
    if x.numel() == 0:
        raise InputError(f"layer '{layer}': empty calibration batch")
    x = x.detach().float()
    return x.permute(*memory_order(x)).reshape(-1)  # a view of a dense tensor in any layout (channels_last too)


def memory_order(x: torch.Tensor) -> list[int]:
    """x's dims from the outermost in memory to the innermost ([0, 2, 3, 1] for channels_last)."""
    return sorted(range(x.dim()), key=lambda d: -x.stride(d))


def check_finite_range(lo: float, hi: float, layer: str) -> None:
    """Raise where a batch's min/max show NaN or Inf (cheaper than isfinite over the batch)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise InputError(f"layer '{layer}': calibration input holds NaN or Inf values (the model's weights are "
                         f"finite: check the calibration data and what the layers before it compute)")


def observed_values(x: torch.Tensor, layer: str) -> tuple[torch.Tensor, float, float]:
    """An observer's batch as flattened float data and its (min, max), checked finite."""
    x = flat_values(x, layer)
    lo, hi = (float(v) for v in torch.aminmax(x))
    check_finite_range(lo, hi, layer)
    return x, lo, hi
