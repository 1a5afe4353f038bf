"""The weight algorithms of a calibrated layer, run after calibration by `finish_weights`: `weight_pipeline` names
the steps for a layer's config (each a function of algorithms/), and a `WeightJob` carries what they work on, the
statistics QuantLayer collected and the weights chosen so far.
"""
import torch
from torch import nn
from tqdm import tqdm

from .algorithms import gptq, nuq
from .algorithms.adaround import adaround
from .algorithms.bias_correction import correct_bias
from .algorithms.scale_refit import refit_scales
from .config import LayerConfig
from .quantizers import WeightQuantizer


def weight_pipeline(config: LayerConfig, layer: nn.Module, axis: int) -> tuple[str, ...]:
    """The weight algorithms (WEIGHT_STEPS) a layer runs after calibration, in order:
    - nuq_codebook: NUQ levels of least output error for the nearest-rounded codes;
    - gptq: the weights chosen on the grid (and codebook) for least output error (Linear, Conv2d, depthwise);
    - adaround: instead of gptq, each weight rounded up or down as learned against the output error (AMCT's
      ada_quantize);
    - scale_refit: below 8 bits, each channel's scale refitted to the chosen codes (at 8 bits it does not pay);
    - nuq_level_refit: NUQ levels refitted to GPTQ's choice, alternating with GPTQ `num_of_iteration` times,
      keeping the best (not for depthwise convs: a channel has too few weights to refit levels from);
    - bias_correction: the output-mean shift of weight quantization removed from the bias."""
    params = config.weight
    steps = ["nuq_codebook"] if params.nuq else []
    if params.rounding in ("gptq", "adaround") and gptq.supported(layer):
        steps.append(params.rounding)
        if params.num_bits < 8:
            steps.append("scale_refit")
        if params.nuq and params.num_of_iteration and not gptq.is_depthwise(layer):
            steps.append("nuq_level_refit")
    if params.bias_correction and axis == 0:
        steps.append("bias_correction")
    return tuple(steps)


class WeightJob:
    """What the weight algorithms of one layer work on: the float weight, its quantizer, the calibration
    statistics, and `chosen`, the weights chosen so far (None: nearest rounding of the float weight)."""

    def __init__(self, name: str, layer: nn.Module, quantizer: WeightQuantizer, pipeline: tuple, mean, power,
                 hessian, folds=None):
        self.name, self.layer, self.quantizer, self.pipeline = name, layer, quantizer, pipeline
        self.weight = layer.weight
        self.original = self.weight.detach().clone()
        self.mean, self.power, self.hessian = mean, power, hessian
        self.folds = folds  # the Hessians of the two halves of the calibration images (None: too few batches)
        self.damp = gptq.DAMP  # GPTQ's damping, chosen by cross-validation where `folds` allow
        self.chosen = None
        self.fallbacks = []  # why an algorithm gave way to a simpler one

    def per_weight(self, channel_values: torch.Tensor) -> torch.Tensor:
        """Per-input-channel values laid out as the weight's [out, in per group]."""
        groups = getattr(self.layer, "groups", 1)
        per_group = channel_values.reshape(groups, -1)
        return per_group.repeat_interleave(self.weight.shape[0] // groups, dim=0)

    def metric(self) -> torch.Tensor:
        """The Hessian the output error is measured with: ridged for a dense layer, as is for a depthwise one."""
        return self.hessian if self.hessian.dim() == 3 else gptq.ridged(self.hessian, self.damp)


def _nuq_codebook(job: WeightJob) -> None:
    """NUQ levels weighted by each input's mean square; by the weights alone where those overflowed float32."""
    per_weight = job.per_weight(job.power)
    if not torch.isfinite(per_weight).all():
        per_weight = torch.ones_like(per_weight)
        job.fallbacks.append("the NUQ codebook fit's input statistics overflowed float32 (inputs beyond about 1e19); "
                             "its levels fit the weights alone. Check the calibration data for extreme values")
    nuq.fit_codebook(job.quantizer, job.weight,
                     per_weight.reshape(per_weight.shape + (1,) * (job.weight.dim() - 2)))


def _dense_solve(weights, hessians, quantizers, damps):
    return gptq.gptq_layers(weights, hessians, quantizers, damp=damps)


def _depthwise_solve(weights, hessians, quantizers, damps):
    return [gptq.gptq_depthwise(w, h, q, d) for w, h, q, d in zip(weights, hessians, quantizers, damps)]


def _choose_damping(jobs: list, solve) -> None:
    """Each job's GPTQ damping cross-validated over the halves of the calibration images (gptq.choose_damping),
    where both halves were seen; where a half's Hessian cannot be factorised, the default (gptq.DAMP) stays."""
    ready = [job for job in jobs if job.folds is not None and all(torch.isfinite(f).all() for f in job.folds)]
    try:
        damps = gptq.choose_damping(solve, [job.weight for job in ready], [job.folds for job in ready],
                                    [job.quantizer for job in ready]) if ready else []
    except torch.linalg.LinAlgError:
        damps = [job.damp for job in ready]
    for job, damp in zip(ready, damps):
        job.damp = damp
    for job in jobs:
        job.folds = None  # chosen once (NUQ's level refits run GPTQ again), and the memory freed


def _gptq(job: WeightJob) -> None:
    """GPTQ, or nearest rounding (with the reason in `job.fallbacks`) where its Cholesky factorisation fails: on
    statistics that overflowed float32, or a Hessian that the damping cannot make positive definite."""
    job.quantizer.fixed_scales = job.quantizer.scales(job.weight)  # GPTQ's weights must not move their scales
    solve = _depthwise_solve if job.hessian.dim() == 3 else _dense_solve
    try:
        if not torch.isfinite(job.hessian).all():
            raise torch.linalg.LinAlgError("the input statistics overflowed float32 (inputs beyond about 1e19)")
        _choose_damping([job], solve)
        job.chosen = solve([job.weight], [job.hessian], [job.quantizer], [job.damp])[0]
    except torch.linalg.LinAlgError as err:
        job.quantizer.fixed_scales, job.chosen = None, None
        reason = str(err).splitlines()[0]
        job.fallbacks.append(f"GPTQ failed ({reason}); its weights are rounded to nearest instead. Check the "
                             f"calibration data for extreme values, or set rounding to nearest for this layer")


def _gptq_together(jobs: list, progress) -> None:
    """_gptq for every job, the dense layers of one weight shape and grid solved together (gptq.gptq_layers), at
    most about BATCH_BYTES of their Hessians at a time; a batch that fails is solved again one layer at a time, so
    only the failing layer falls back. `progress(n)` is told of each n layers done."""
    batches = {}
    for job in jobs:
        params = job.quantizer.params
        if job.hessian.dim() == 3 or job.quantizer.table is not None or not torch.isfinite(job.hessian).all():
            _gptq(job)  # depthwise (already one batch over channels), NUQ, or falling back
            progress(1)
        else:
            key = (tuple(job.weight.shape), params.num_bits, params.channel_wise, job.weight.device)
            batches.setdefault(key, []).append(job)
    for members in batches.values():
        width = min(members[0].weight[0].numel(), gptq.MAX_GROUP)
        size = max(1, BATCH_BYTES // (8 * width ** 2))
        for start in range(0, len(members), size):
            batch = members[start:start + size]
            for job in batch:
                job.quantizer.fixed_scales = job.quantizer.scales(job.weight)
            try:
                _choose_damping(batch, _dense_solve)
                chosen = _dense_solve([job.weight for job in batch], [job.hessian for job in batch],
                                      [job.quantizer for job in batch], [job.damp for job in batch])
            except torch.linalg.LinAlgError:
                for job in batch:
                    _gptq(job)
            else:
                for job, weight in zip(batch, chosen):
                    job.chosen = weight
            progress(len(batch))


def _adaround(job: WeightJob) -> None:
    """AdaRound, with a progress bar of its steps, or nearest rounding (with the reason in `job.fallbacks`) on
    statistics that overflowed float32."""
    if not torch.isfinite(job.hessian).all():
        job.fallbacks.append("AdaRound skipped: the input statistics overflowed float32 (inputs beyond about "
                             "1e19); its weights are rounded to nearest instead. Check the calibration data")
        return
    with tqdm(total=job.quantizer.params.num_iteration, desc=f"AdaRound {job.name}", unit="it", leave=False,
              disable=None) as bar:
        def progress(steps, loss):
            bar.update(steps)
            bar.set_postfix(loss=f"{loss:.4g}")
        job.chosen = adaround(job.weight, job.hessian, job.quantizer, progress)


def _scale_refit(job: WeightJob) -> None:
    if job.chosen is not None:
        job.chosen = refit_scales(job.weight, job.chosen, job.metric(), job.quantizer)


def _nuq_level_refit(job: WeightJob) -> None:
    if job.chosen is None:
        return
    quantizer, metric = job.quantizer, job.metric()
    rounding = [WEIGHT_STEPS[step] for step in ("gptq", "scale_refit") if step in job.pipeline]
    best = None

    def keep():
        nonlocal best
        error = float(gptq.output_error(job.chosen - job.weight, metric).sum())  # the layer's output error
        if best is None or error < best[0]:
            best = (error, job.chosen, quantizer.levels, quantizer.table, quantizer.fixed_scales)

    keep()
    for _ in range(quantizer.params.num_of_iteration):
        job.chosen = nuq.refit_levels(job.weight, job.chosen, job.hessian, quantizer, job.damp)
        keep()
        for step in rounding:
            step(job)
        keep()
    _, job.chosen, quantizer.levels, quantizer.table, quantizer.fixed_scales = best


def _bias_correction(job: WeightJob) -> None:
    weight = job.weight if job.chosen is None else job.chosen
    correct_bias(job.layer, job.quantizer(weight), job.original, job.per_weight(job.mean))


WEIGHT_STEPS = {"nuq_codebook": _nuq_codebook, "gptq": _gptq, "adaround": _adaround, "scale_refit": _scale_refit,
                "nuq_level_refit": _nuq_level_refit, "bias_correction": _bias_correction}
BATCH_BYTES = 2 ** 27  # float64 Hessian blocks of the layers GPTQ solves together
HESSIAN_STEPS = {"gptq", "adaround"}  # the steps that read the layer's input Hessian


def finish_weights(layers: list) -> None:
    """After calibration: every layer's weight pipeline on its statistics, one step at a time across the layers
    (so GPTQ can solve layers of one shape together), then the chosen weights kept."""
    jobs = [(layer, job) for layer in layers if (job := layer.weight_job()) is not None]
    total = sum(len(job.pipeline) for _, job in jobs)
    with tqdm(total=total, desc="weight algorithms", unit="step", leave=False, disable=len(jobs) < 8) as bar:
        for step, run in WEIGHT_STEPS.items():
            members = [job for _, job in jobs if step in job.pipeline]
            if step == "gptq":
                _gptq_together(members, bar.update)
                continue
            for job in members:
                run(job)
                bar.update()
    for layer, job in jobs:
        layer.keep(job)
