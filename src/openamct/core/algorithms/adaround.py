"""AdaRound (Nagel et al. 2020; AMCT's `ada_quantize`): each weight rounded up or down, as learned against the
layer's output error, not to nearest.

Each weight w = s * (floor(w / s) + r) gets a soft rounding h(V) in [0, 1] (the rectified sigmoid), trained with
Adam on  E[|(W~ - W) x|^2] / E[|(W_nearest - W) x|^2] + reg_param * sum(1 - |2 h(V) - 1|^beta),  beta annealed
from beta_range[0] to beta_range[1] after the first warm_start share of the iterations; the regulariser drives
every h to 0 or 1, and the final rounding is h >= 0.5. The reconstruction is measured against nearest rounding's:
unscaled, a layer with large inputs (a project conv after ReLU6) outweighs the regulariser so far that a third of
its roundings were still undecided at the end, and its output error stayed 7 times GPTQ's.

The reconstruction term is a quadratic form in the weight error: E[|D x|^2] = tr(D H D^T) with H = E[x x^T], the
Hessian that calibration already gathers for GPTQ. So an iteration costs one [out, K] x [K, K] product (per column
group, or per channel for a depthwise conv), whatever the number of calibration positions, and its gradient,
2 D H, needs no second product.
"""
import torch

from ..primitives import qrange
from .gptq import _extremes, column_groups

GAMMA, ZETA = -0.1, 1.1  # the rectified sigmoid's stretch (the paper's values)
REPORT_EVERY = 100  # steps between loss reports: the loss is not needed for the steps themselves
LEARNING_RATE = 1e-2  # Adam on V: the paper's 1e-3 needs its 10^4 iterations; 1e-2 gets as far in 2 000


def _soft(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1) and its derivative dh/dV."""
    sigmoid = torch.sigmoid(v)
    stretched = sigmoid * (ZETA - GAMMA) + GAMMA
    inside = (stretched > 0) & (stretched < 1)
    return stretched.clamp(0, 1), torch.where(inside, sigmoid * (1 - sigmoid) * (ZETA - GAMMA), 0.0)


def _product(delta: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """delta H: per column group of a dense layer's Hessian [K, K] (only its diagonal blocks are estimated), per
    channel for a depthwise conv's [C, k, k]."""
    if hessian.dim() == 3:
        return torch.bmm(delta[:, None, :], hessian)[:, 0]
    out = torch.empty_like(delta)
    for group in column_groups(delta.shape[1]):
        out[:, group] = delta[:, group] @ hessian[group, group]
    return out


def beta_at(step: int, params) -> float | None:
    """The regulariser's beta at `step` (None during the warm start, when only the reconstruction is trained)."""
    warm = params.warm_start * params.num_iteration
    if step < warm:
        return None
    start, end = params.beta_range
    progress = (step - warm) / max(params.num_iteration - warm, 1)
    return end + (start - end) * max(0.0, 1.0 - progress)


def learn_rounding(w: torch.Tensor, scale: torch.Tensor, hessian: torch.Tensor, kept: torch.Tensor, params,
                   progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(the learned soft rounding h(V) of each weight of `w` ([out, K]) on the grid `scale` ([out or 1, 1]), the
    final codes): AdaRound with the quantizer params' num_iteration, reg_param, beta_range and warm_start; the
    `kept` weights are rounded to nearest. `progress(steps, loss)` is told every REPORT_EVERY steps how many were
    done and the loss of the last."""
    qmin, qmax = qrange(params.num_bits)
    scaled = w / scale
    base = torch.floor(scaled)
    nearest = torch.clamp(torch.round(scaled), qmin, qmax)
    error = nearest * scale - w
    scale_free = float((_product(error, hessian) * error).sum())
    if scale_free > 0:  # the reconstruction in units of nearest rounding's error, so reg_param means the same in
        hessian = hessian / scale_free  # every layer whatever its activations' magnitude
    rest = (scaled - base).clamp(0.01, 0.99)  # h(V) starts at the fractional part, as the paper does
    v = (-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)).requires_grad_()
    v.grad = torch.zeros_like(v)  # set by hand each step: the gradient is analytic (no autograd graph)
    optimizer = torch.optim.Adam([v], lr=LEARNING_RATE)
    reported = 0
    for step in range(params.num_iteration):
        soft, slope = _soft(v.detach())
        codes = base + soft
        free = (codes >= qmin) & (codes <= qmax) & ~kept
        delta = torch.where(kept, nearest, codes.clamp(qmin, qmax)) * scale - w
        product = _product(delta, hessian)
        grad = 2 * product * scale * free * slope  # d tr(D H D^T) / dV, H symmetric
        beta = beta_at(step, params)
        if beta is not None:
            centred = 2 * soft - 1
            magnitude = centred.abs()
            grad -= params.reg_param * beta * magnitude ** (beta - 1) * torch.sign(centred) * 2 * slope
        v.grad.copy_(grad)
        optimizer.step()
        done = step + 1
        if progress is not None and (done % REPORT_EVERY == 0 or done == params.num_iteration):
            loss = float((product * delta).sum())
            if beta is not None:
                loss += params.reg_param * float((1 - magnitude ** beta).sum())
            progress(done - reported, loss)
            reported = done
    soft = _soft(v.detach())[0]
    return soft, torch.where(kept, nearest, torch.clamp(base + (soft >= 0.5).to(w), qmin, qmax))


def adaround(weight: torch.Tensor, hessian: torch.Tensor, quantizer, progress=None) -> torch.Tensor:
    """The weight on the quantizer's grid, each rounding learned (learn_rounding). The weights that set each
    channel's scale are rounded to nearest, so the scales, fixed here, stay what ARQ computes from the result.
    Returns dequantized weights."""
    shape = weight.shape
    w = weight.detach().float().reshape(shape[0], -1)
    quantizer.fixed_scales = quantizer.scales(weight)
    scale = quantizer.fixed_scales.to(w).reshape(-1, 1)
    kept = _extremes(w, quantizer.params.channel_wise)
    _, codes = learn_rounding(w, scale, hessian.to(w), kept, quantizer.params, progress)
    return (codes * scale).reshape(shape).to(weight.dtype)
