"""Scale refit: GPTQ's codes kept, each output channel's scale moved to the one of least output error for them.
GPTQ chooses the codes for the scale the weights' range set, which is not the best scale for the codes it chose;
below 8 bits the difference matters."""
import torch


def refit_scales(weight: torch.Tensor, chosen: torch.Tensor, hessian: torch.Tensor, quantizer,
                 limit: float = 0.1) -> torch.Tensor:
    """GPTQ's codes kept, each output channel's scale set to the one that minimises the layer's output error for
    them, s * <q, w>_H / <q, q>_H with q = `chosen` (within `limit` of s): GPTQ chose the codes for the scale the
    weights' range set, which is not the best scale for the codes it chose. Updates the quantizer's fixed scales
    and returns the weights on them. The code that set each scale stays the largest, so ARQ's scale recomputed from
    the weights is the new one. `hessian` is [K, K], or [C, K, K] for a depthwise conv."""
    w = weight.detach().double().reshape(weight.shape[0], -1)
    q = chosen.detach().double().reshape(w.shape)
    h = hessian.to(w.device).double()
    qh = q @ h if h.dim() == 2 else torch.einsum("ck,ckj->cj", q, h)
    num, den = (qh * w).sum(1), (qh * q).sum(1)
    if quantizer.fixed_scales.numel() == 1:
        num, den = num.sum(), den.sum()
    ratio = torch.where(den > 0, num / den.clamp(min=torch.finfo(den.dtype).tiny), torch.ones_like(num))
    ratio = ratio.clamp(1 - limit, 1 + limit)
    quantizer.fixed_scales = quantizer.fixed_scales * ratio.to(quantizer.fixed_scales).reshape(
        quantizer.fixed_scales.shape)
    return (q * ratio.reshape(-1, 1)).reshape(weight.shape).to(weight.dtype)
