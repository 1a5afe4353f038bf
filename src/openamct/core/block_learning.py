"""Learning one block of block reconstruction (core/reconstruction.py): its layers' roundings and its activations'
step sizes against the float block's output, on the block's cached inputs (see that module's docstring for the
method); and the overrides through which a block runs as float, or as it learns.
"""
import math

import torch
from torch import nn
from torch.func import functional_call
from tqdm import tqdm

from . import log
from .algorithms.adaround import GAMMA, ZETA, beta_at
from .primitives import channel_view, fake_quant, qrange
from .simulation import shared_quantized, simulating

ROUNDING_LR = 3e-2  # Adam's step on V: a rounding started at START can flip within about 70 steps
SCALE_LR = 1e-3  # Adam's step on the log of each activation step size: about 0.1 % of the scale per step
START = 0.95  # h(V) at the start: near the chosen rounding, so the block starts about where the weight algorithm
# left it (at 0.8 the soft weights start far worse than the hard ones, and what is learned fits the soft ones)
CHECK_EVERY = 50  # steps between the checks of the held-aside error (and whether every rounding has settled)
HELD_ASIDE = 48  # calibration samples the block does not learn on: its error on them picks the state kept
PATIENCE = 4  # checks without a lower held-aside error after which learning stops
JUDGED_WINDOWS = 4  # windows of each held-aside sample its error is measured on
WINDOW = 24  # side of the output windows a spatially local block learns on (see Windows)


class Overrides:
    """Sets `override` on layers and quantizers for the duration of a `with`."""

    def __init__(self, functions: dict):
        self.functions = functions  # module -> function

    def __enter__(self):
        for module, function in self.functions.items():
            module.override = function

    def __exit__(self, *exc):
        for module in self.functions:
            module.override = None


class Windows:
    """Random windows of a spatially local block's maps. On a window of its input the block computes its output's
    window as on the whole map, except within `margin` of the window's edges (where its padding differs), so a step
    can learn on windows: far fewer positions per step, from more images. Whether the block is local, and its
    margin, is measured, not assumed: blocks whose output depends on the whole map (squeeze-excite, attention,
    pooling) or whose maps are not images, or no larger than a window, are learned on whole maps."""

    def __init__(self, block: nn.Module, x: torch.Tensor, target: torch.Tensor):
        self.side = None  # output window side; None: whole maps
        if x.dim() != 4 or target.dim() != 4 or min(target.shape[-2:]) <= WINDOW:
            return
        stride = x.shape[-1] // target.shape[-1]
        if tuple(x.shape[-2:]) != (stride * target.shape[-2], stride * target.shape[-1]):
            return
        top, left = (target.shape[-2] - WINDOW) // 2, (target.shape[-1] - WINDOW) // 2
        with torch.no_grad():
            window = block(self._input_window(x[:2], top, left, stride))
        if window.shape[-2:] != (WINDOW, WINDOW):
            return
        exact = target[:2, :, top:top + WINDOW, left:left + WINDOW]
        wrong = ((window - exact).abs() > 1e-4 * exact.abs().amax() + 1e-6).flatten(0, 1).any(0)
        rows, cols = torch.nonzero(wrong, as_tuple=True)
        depth = torch.minimum(torch.minimum(rows, cols), torch.minimum(WINDOW - 1 - rows, WINDOW - 1 - cols))
        margin = int(depth.max()) + 1 if len(depth) else 0
        if margin <= WINDOW // 4:
            self.side, self.margin, self.stride = WINDOW, margin, stride

    @staticmethod
    def _input_window(x, top, left, stride):
        return x[..., top * stride:(top + WINDOW) * stride, left * stride:(left + WINDOW) * stride]

    def draw(self, x_quant, x_float, target, pick, generator):
        """(quantized input, float input, target) of the samples `pick`, on one random window or whole."""
        if self.side is None:
            return x_quant[pick], x_float[pick], target[pick]
        top, left = (int(torch.randint(size - WINDOW + 1, (), generator=generator)) for size in target.shape[-2:])
        inner = slice(top + self.margin, top + WINDOW - self.margin), slice(left + self.margin,
                                                                            left + WINDOW - self.margin)
        return (self._input_window(x_quant, top, left, self.stride)[pick],
                self._input_window(x_float, top, left, self.stride)[pick], target[..., inner[0], inner[1]][pick])

    def judged(self, x_quant, target, count: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) the held-aside error is measured on: the first `count` samples, on JUDGED_WINDOWS
        windows each, drawn once (a forward of an early block on whole maps costs tens of learning steps)."""
        if self.side is None:
            return x_quant[:count], target[:count]
        draws = [self.draw(x_quant, x_quant, target, torch.arange(count), generator) for _ in range(JUDGED_WINDOWS)]
        return torch.cat([draw[0] for draw in draws]), torch.cat([draw[2] for draw in draws])

    def inner(self, output):
        """The part of the block's output on a window that matches the whole map's."""
        if self.side is None or not self.margin:
            return output
        return output[..., self.margin:-self.margin, self.margin:-self.margin]


class _SoftRounding:
    """A layer's weight as AdaRound's soft rounding between the two levels around each float weight (grid levels,
    or the NUQ codebook's), on the layer's scales (fixed from here on), starting near the rounding chosen so far:
    weight = scale * (low + h(V) * step)."""

    def __init__(self, layer, float_weight: torch.Tensor):
        quantizer = layer.weight_quantizer
        weight = layer.layer.weight
        quantizer.fixed_scales = quantizer.scales(weight).detach()
        self.layer = layer
        self.scale = channel_view(quantizer.fixed_scales.to(weight), weight.dim(), layer.axis)
        chosen = quantizer.codes(weight, quantizer.fixed_scales)
        scaled = float_weight / self.scale
        if quantizer.levels is None:
            qmin, qmax = qrange(quantizer.params.num_bits)
            self.low = torch.minimum(torch.maximum(torch.floor(scaled), chosen - 1), chosen).clamp(qmin, qmax)
            self.step = (self.low + 1).clamp(max=qmax) - self.low
        else:
            self.low, self.step = _codebook_neighbours(quantizer.levels, scaled, chosen)
        up = (chosen > self.low) & (self.step > 0)  # the chosen code is low or low + step
        start = torch.where(up, START, 1 - START)
        self.v = nn.Parameter(-torch.log((ZETA - GAMMA) / (start - GAMMA) - 1))

    hardened = False  # set while the held-aside error is measured: the weight is the hard rounding

    def soft(self) -> torch.Tensor:
        return (torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)

    def weight(self) -> torch.Tensor:
        return self.hard() if self.hardened else (self.low + self.soft() * self.step) * self.scale

    def hard(self) -> torch.Tensor:
        return (self.low + (self.soft() >= 0.5).to(self.low) * self.step) * self.scale

    def regulariser(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.soft() - 1).abs().pow(beta)).sum()

    def settled(self) -> bool:
        soft = self.soft()
        return bool(((soft == 0) | (soft == 1) | (self.step == 0)).all())


def _codebook_neighbours(levels, scaled: torch.Tensor, chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, step) of each weight on a NUQ codebook (`levels`: [num_steps], or [out, num_steps] per channel): the
    codebook level at or below the weight, moved so that the chosen level is low or low + step."""
    shape = scaled.shape
    rows = scaled.reshape(shape[0], -1)
    table = torch.as_tensor(levels, dtype=rows.dtype, device=rows.device)
    table = (table if table.dim() == 2 else table[None]).expand(shape[0], -1).contiguous()
    below = (torch.searchsorted(table, rows.contiguous(), right=True) - 1).clamp(0, table.shape[1] - 1)
    picked = torch.searchsorted(table, chosen.reshape(shape[0], -1).contiguous())
    index = torch.minimum(torch.maximum(below, picked - 1), picked).clamp(0, table.shape[1] - 1)
    low = torch.gather(table, 1, index)
    high = torch.gather(table, 1, (index + 1).clamp(max=table.shape[1] - 1))
    return low.reshape(shape), (high - low).reshape(shape)


class _StepSize:
    """An activation quantizer with a learned step size (its offset kept), QDrop applied while learning. The step
    stays within what the producer's bounds allow (ReLU6: 6 / 255), so the deployed model still drops the clip
    before the quantization, as calibration planned it."""

    def __init__(self, quantizer, drop_prob: float, generator: torch.Generator):
        self.quantizer, self.drop_prob, self.generator = quantizer, drop_prob, generator
        qmin, qmax = qrange(quantizer.params.num_bits)
        offset = float(quantizer.offset)
        low, high = quantizer.bounds
        caps = [high / (qmax - offset) if math.isfinite(high) and qmax > offset else math.inf,
                low / (qmin - offset) if math.isfinite(low) and qmin < offset else math.inf]
        self.cap = min(caps) * (1 - 1e-6)
        # started at the cap, not above it, where the clamp would pass it no gradient
        self.log_scale = nn.Parameter(quantizer.scale.detach().clone().clamp(max=self.cap).log())

    def scale(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=self.cap)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return shared_quantized(x, self._quantize)

    hardened = False  # set while the held-aside error is measured: no QDrop

    def _quantize(self, x: torch.Tensor) -> torch.Tensor:
        xq = fake_quant(x, self.scale(), self.quantizer.offset, self.quantizer.params.num_bits)
        if not self.drop_prob or self.hardened:
            return xq
        dropped = torch.rand(x.shape, generator=self.generator, device=x.device) < self.drop_prob
        return torch.where(dropped, x, xq)


def _learning(members: dict, roundings: dict, steps: dict) -> Overrides:
    """The block's layers on their soft roundings and learned steps."""
    def forward(layer, rounding):
        def run(x):
            y = functional_call(layer.layer, {"weight": rounding.weight()}, (layer.input_quantizer(x),))
            return layer.output_quantizer(y) if layer.output_quantizer is not None else y
        return run
    functions = {layer: forward(layer, roundings[name]) for name, layer in members.items()}
    functions.update({step.quantizer: step for step in steps.values()})
    return Overrides(functions)


def _error(block: nn.Module, judged: tuple, windows: Windows, parts=()) -> float:
    """The block's mean squared output error on the `judged` (inputs, targets) as the model now computes it; with
    `parts` (the roundings and steps being learned), on the hard roundings without QDrop."""
    for part in parts:
        part.hardened = True
    try:
        with torch.no_grad(), simulating():
            return float(torch.nn.functional.mse_loss(windows.inner(block(judged[0])), judged[1]))
    finally:
        for part in parts:
            part.hardened = False


def reconstruct_block(block: nn.Module, members: dict, floats: dict, x_float: torch.Tensor,
                      x_quant: torch.Tensor, target: torch.Tensor, windows: Windows, params,
                      name: str) -> tuple[float, float]:
    """Learn the block's roundings and activation steps (see the module docstring); returns its output error on
    the held-aside samples (before, after).

    The first HELD_ASIDE samples are not learned on (where there are at least twice as many): every CHECK_EVERY
    steps the block's error on them, with the roundings made hard, is measured, and the state with the lowest
    error is the one kept, the block as calibrated included. Learning stops after PATIENCE checks without a lower
    error. On a few hundred images the roundings fit the samples they learn on well before they stop helping on
    others."""
    device = x_quant.device
    samples = torch.Generator().manual_seed(params.seed)
    masks = torch.Generator(device=device).manual_seed(params.seed)
    held = HELD_ASIDE if len(x_quant) >= 2 * HELD_ASIDE else 0
    judged = windows.judged(x_quant, target, held or min(HELD_ASIDE, len(x_quant)), samples)
    before = _error(block, judged, windows)
    quantizers = {id(q): q for layer in members.values()
                  for q in (layer.input_quantizer, layer.output_quantizer) if q is not None}
    fixed = {layer: layer.weight_quantizer.fixed_scales for layer in members.values()}  # _SoftRounding fixes them
    roundings = {layer_name: _SoftRounding(layer, floats[layer_name][0]) for layer_name, layer in members.items()}
    steps = {key: _StepSize(q, params.drop_prob, masks) for key, q in quantizers.items()}
    vs, log_scales = [r.v for r in roundings.values()], [s.log_scale for s in steps.values()]
    learned, parts = vs + log_scales, list(roundings.values()) + list(steps.values())
    optimizer = torch.optim.Adam([{"params": vs, "lr": ROUNDING_LR}, {"params": log_scales, "lr": SCALE_LR}])
    unit = max(before, 1e-30)
    best, best_state, stale = before, None, 0  # best_state None: the block as calibrated
    batch = min(params.batch_size, len(x_quant) - held)
    bar = tqdm(total=params.num_iteration, desc=f"reconstruct {name}", unit="it", leave=False, disable=None)
    with torch.enable_grad(), _learning(members, roundings, steps), bar:
        for step in range(1, params.num_iteration + 1):
            pick = held + torch.randint(len(x_quant) - held, (batch,), generator=samples)
            quant, exact, wanted = windows.draw(x_quant, x_float, target, pick, samples)
            if params.drop_prob:
                dropped = torch.rand(quant.shape, generator=masks, device=device) < params.drop_prob
                quant = torch.where(dropped, exact, quant)
            with simulating():
                loss = torch.nn.functional.mse_loss(windows.inner(block(quant)), wanted) / unit
            beta = beta_at(step - 1, params)
            if beta is not None:
                loss = loss + params.reg_param * sum(r.regulariser(beta) for r in roundings.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.update()
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.4g}", held_aside=f"{best / unit:.4g}")
            if step % CHECK_EVERY and step != params.num_iteration:
                continue
            error = _error(block, judged, windows, parts)
            if error < best:
                best, best_state, stale = error, [p.detach().clone() for p in learned], 0
            else:
                stale += 1
            if stale >= PATIENCE or (beta is not None and all(r.settled() for r in roundings.values())):
                break
        with torch.no_grad():
            if best_state is not None:
                for parameter, value in zip(learned, best_state):
                    parameter.copy_(value)
                for rounding in roundings.values():
                    rounding.layer.layer.weight.copy_(rounding.hard())
                for step_size in steps.values():
                    step_size.quantizer.scale.fill_(float(step_size.scale()))
    if best_state is None:
        for layer, scales in fixed.items():
            layer.weight_quantizer.fixed_scales = scales
        log.info(f"Block '{name}': reconstruction did not lower its output error on held-aside samples "
                 f"({before:.4g}); it is kept as calibrated.", "Reconstruction")
        return before, before
    return before, best
