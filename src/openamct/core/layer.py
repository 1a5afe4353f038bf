"""The quantized layer of a calibration/simulation model: a float layer plus its quantizers, the statistics its
weight algorithms need, and the pipeline that runs them after calibration.

While calibrating, a layer records each input channel's mean and mean square (bias correction, NUQ's level fit)
and, where GPTQ runs, the Hessian of its kernel's input. `finish_weights` then runs the weight algorithms that
`weight_pipeline` names for the layer's config, in order, each a function of algorithms/; the chosen weights
replace the float ones. Once calibrated, the layer computes as the deployed model does (`_integer_forward`).
"""
import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call
from tqdm import tqdm

from . import log
from .algorithms import dmq, gptq, nuq
from .algorithms.adaround import adaround
from .algorithms.bias_correction import correct_bias
from .algorithms.scale_refit import refit_scales
from .config import LayerConfig
from .primitives import channel_view, quantize_bias, round_ste, straight_through
from .quantizers import ActQuantizer, WeightQuantizer
from .simulation import Accumulator, active_mode


@dataclass(frozen=True)
class LayerRecord:
    """A calibrated layer's quantization parameters: what the record file holds and the exported models use.
    `scale_o`/`offset_o`: the output's (after the ReLU/clip that follows the layer), where something other than a
    quantized layer reads it; `nuq_levels`: the NUQ codebook(s);
    `tensor_balance_factor`: the DMQ factors the layer's input is divided by (algorithms/dmq.py)."""
    scale_d: float
    offset_d: int
    scale_w: tuple
    offset_w: tuple
    scale_o: float | None = None
    offset_o: int | None = None
    nuq_levels: tuple = ()
    tensor_balance_factor: tuple = ()


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


class _WeightJob:
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


def _nuq_codebook(job: _WeightJob) -> None:
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


def _gptq(job: _WeightJob) -> None:
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


def _adaround(job: _WeightJob) -> None:
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


def _scale_refit(job: _WeightJob) -> None:
    if job.chosen is not None:
        job.chosen = refit_scales(job.weight, job.chosen, job.metric(), job.quantizer)


def _nuq_level_refit(job: _WeightJob) -> None:
    if job.chosen is None:
        return
    quantizer, metric = job.quantizer, job.metric()
    rounding = [WEIGHT_STEPS[step] for step in ("gptq", "scale_refit") if step in job.pipeline]
    best = None

    def keep():
        nonlocal best
        delta = (job.chosen - job.weight).detach().double().reshape(job.weight.shape[0], -1)
        error = float(torch.einsum("oi,ij,oj->", delta, metric, delta))  # the layer's output error
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


def _bias_correction(job: _WeightJob) -> None:
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


def _halves(x: torch.Tensor, call: dict | None, batch: int):
    """(fold, part of `x`, its conv2d call) for the two halves of the images of a calibration batch, whose
    Hessians are summed apart so that GPTQ's damping can be cross-validated (gptq.choose_damping); a batch of
    one image goes whole to the half its batch number picks."""
    if len(x) < 2:
        return [(batch % 2, x, call)]
    half = len(x) // 2
    return [(fold, x[part], call and call | {"input": call["input"][part]})
            for fold, part in enumerate((slice(0, half), slice(half, None)))]


class QuantLayer(nn.Module):
    """`layer` (BN already folded) run on fake-quantized input and weights through its own forward.

    `output_quantizer`: where something other than a quantized layer reads the output (api.prepare), as the
    runtime needs a quantize after the layer to run it on integers. It follows the ReLU/clip after the layer (its
    `bounds`), applied here first so that it observes and requantizes what the fused integer kernel outputs."""

    collects_statistics = True  # input moments and GPTQ's Hessian for finish_weights (QAT: not needed)

    def __init__(self, layer: nn.Module, config: LayerConfig, input_quantizer: ActQuantizer, name: str, axis: int,
                 output_quantizer: ActQuantizer | None = None):
        super().__init__()
        self.layer, self.name, self.axis = layer, name, axis
        self.input_quantizer = input_quantizer
        self.weight_quantizer = WeightQuantizer(config.weight, axis)
        self.output_quantizer = output_quantizer
        self.pipeline = weight_pipeline(config, layer, axis)
        self.fallback = None  # set when a weight algorithm failed and a simpler one served (logged, reported)
        self.input_moments = None  # running sums of each input channel's mean and mean square
        self.hessian = None  # GPTQ: running sums of E[x x^T] over the weight's columns, per half of the images
        self._fold_batches = [0, 0]  # the batches (halves of batches) summed into each half
        self._batches = 0
        self._generator = None
        self._weight_cache = None  # (weight's storage and version, its fake-quantized value)
        self.override = None  # replaces forward while block reconstruction runs (core/reconstruction.py)
        self.deploy_float = False  # set by the export where the INT8 kernel is the slower (onnx_export/fallback.py)
        self.register_buffer("balance", None)  # DMQ factors s: the input is divided by them (balance_input)

    def __getattr__(self, name):
        """Attributes of the wrapped layer (in_features, stride, ...) read through: model code that uses them works."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("layer"), name)

    def _observe(self, x: torch.Tensor, call: dict | None) -> None:
        channel_dim = -1 if isinstance(self.layer, nn.Linear) else 1
        dims = [d for d in range(x.dim()) if d != channel_dim % x.dim()]
        x = x.detach().float()
        mean = x.mean(dims)
        power = x.pow(2).mean(dims) if "nuq_codebook" in self.pipeline else torch.zeros_like(mean)  # NUQ's weighting
        moments = torch.stack([mean, power])
        if self.input_moments is None:
            self.input_moments = moments
        else:  # in place: a new sum each batch would be allocated above the batch's activations and fragment the heap
            self.input_moments += moments
        self._batches += 1
        if HESSIAN_STEPS & set(self.pipeline):
            if self._generator is None:  # the positions sampled for the Hessian: the same on every run
                self._generator = torch.Generator().manual_seed(0)
            columns = self.layer.weight[0].numel()
            params = self.weight_quantizer.params
            fine = params.nuq or params.num_bits < 8
            rows = gptq.hessian_rows(columns, self.input_quantizer.batch_num, fine=fine)
            # in halves where GPTQ's damping will be cross-validated: below 8 bits, where its rounding errors and
            # the overfitting they allow are large
            parts = _halves(x, call, self._batches) if fine and "gptq" in self.pipeline else [(0, x, call)]
            for fold, part, part_call in parts:
                hessian = gptq.hessian(self.layer, part, part_call, -(-rows * len(part) // len(x)), self._generator)
                if hessian is None:
                    return
                if self.hessian is None:
                    self.hessian = hessian.new_zeros((2,) + hessian.shape)
                self.hessian[fold] += hessian  # in place, as the moments
                self._fold_batches[fold] += 1

    def weight_job(self) -> _WeightJob | None:
        """After calibration: what the weight pipeline works on (None where no statistics were collected); the
        statistics are handed over."""
        self._weight_cache = None
        if self.input_moments is None:
            return None
        mean, power = (self.input_moments / self._batches).to(self.layer.weight.device)
        folds = hessian = None
        if self.hessian is not None:
            hessian = self.hessian.sum(0).div_(sum(self._fold_batches))
            if min(self._fold_batches):  # each half's mean, in place: no third copy
                folds = [self.hessian[i].div_(count) for i, count in enumerate(self._fold_batches)]
        self.input_moments = self.hessian = None
        return _WeightJob(self.name, self.layer, self.weight_quantizer, self.pipeline, mean, power, hessian, folds)

    def keep(self, job: _WeightJob) -> None:
        """The pipeline's chosen weights replace the float ones; a fallback is logged and kept for the report."""
        if job.fallbacks:
            self.fallback = "; ".join(job.fallbacks)
            log.warning(f"layer '{self.name}': {self.fallback}", "Calibration")
        if job.chosen is not None:
            with torch.no_grad():
                self.layer.weight.copy_(job.chosen)

    def balance_input(self, factors: torch.Tensor) -> None:
        """DMQ (algorithms/dmq.py): the weight multiplied by `factors` along its input channels, and the input
        multiplied by their float32 inverses from here on, before anything reads it (quantizer, statistics,
        block reconstruction), as the exported models' Mul does; the float layer computes the same function."""
        self.balance = factors.to(self.layer.weight)
        dmq.scale_weight(self.layer, self.balance)

    def forward(self, x):
        if self.balance is not None:
            x = x * dmq.inverse_view(self.layer, self.balance)
        if self.override is not None:
            return self.override(x)
        if not self.input_quantizer.calibrated:
            xq = self.input_quantizer(x)
            weights = {"weight": self._calibration_weight()}
            if self.collects_statistics:
                # only a conv's Hessian needs its kernel's input: other layers skip the mode's per-op cost
                reads_kernel = HESSIAN_STEPS & set(self.pipeline) and not isinstance(self.layer, nn.Linear)
                kernel = gptq.KernelInput() if reads_kernel else None
                with kernel or contextlib.nullcontext():
                    y = functional_call(self.layer, weights, (xq,))
                self._observe(x, kernel.call if kernel else None)
            else:
                y = functional_call(self.layer, weights, (xq,))
        elif self.deploy_float:  # deployed with float weights, being faster so (onnx_export/fallback.py)
            y = self.layer(self.input_quantizer(x))
        else:
            y = self._integer_forward(self.input_quantizer(x))
        if self.output_quantizer is None:
            return y
        return self.output_quantizer(torch.clamp(y, *self.output_quantizer.bounds))  # the ReLU/clip it follows

    def _calibration_weight(self) -> torch.Tensor:
        """The weight the calibration forward runs with: the best guess of the deployed one, so that the layers
        after it see the inputs they will see deployed. That is the fake-quantized weight, except below 8 bits
        where GPTQ or AdaRound will move the weights far from nearest rounding (which breaks a 4-bit network):
        there the float weight is the closer guess."""
        if self.collects_statistics and HESSIAN_STEPS & set(self.pipeline) and \
                self.weight_quantizer.params.num_bits < 8:
            return self.layer.weight
        return self._quantized_weight()

    def _quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight; without gradients (PTQ calibration), computed once while the weight is
        unchanged rather than on every batch."""
        weight = self.layer.weight
        if torch.is_grad_enabled():
            return self.weight_quantizer(weight)
        key = (weight.data_ptr(), weight._version)
        if self._weight_cache is None or self._weight_cache[0] != key:
            self._weight_cache = (key, self.weight_quantizer(weight))
        return self._weight_cache[1]

    def _integer_forward(self, xq: torch.Tensor) -> torch.Tensor:
        """The layer on integer codes, then one division by 1 / (scale_d * scale_w), the accumulator scale.

        This is the deployed arithmetic: the conv of small integers is exact in float32, so the fake-quant ONNX
        model (which does the same) agrees with this simulation bit for bit, and the bias is added as the INT32
        codes QLinearConv adds. Gradients pass straight through the roundings.
        """
        scale = self.input_quantizer.scale
        codes = round_ste(xq / scale)
        scale_w = self.weight_scales().to(xq.device)
        weight = self.layer.weight
        weight_codes = straight_through(weight / channel_view(scale_w, weight.dim(), self.axis),
                                        self.weight_quantizer.codes(weight, scale_w))
        grid = scale * scale_w
        bias = self.layer.bias
        if bias is not None:
            bias = straight_through(bias / grid, quantize_bias(bias, grid))
        acc = functional_call(self.layer, {"weight": weight_codes, "bias": bias}, (codes,))
        channel_axis = acc.dim() - 1 if isinstance(self.layer, nn.Linear) else 1
        inverse = 1.0 / grid  # divided by, as the fake-quant ONNX model does (see onnx_export/qdq.build_quantized)
        y = acc / (channel_view(inverse, acc.dim(), channel_axis) if inverse.numel() > 1 else inverse)
        mode = active_mode()
        if mode is not None:
            mode.put_accumulator(y, Accumulator(acc, grid, channel_axis))
        return y

    def weight_scales(self) -> torch.Tensor:
        """scale_w as deployed: the quantizer's, raised where the INT32 bias on the grid scale_d * scale_w would
        overflow (channels whose weights BN folding made all but zero, whose codes are 0 either way)."""
        scale_w = self.weight_quantizer.scales(self.layer.weight).detach()
        if self.layer.bias is None:
            return scale_w
        floor = self.layer.bias.detach().abs().to(scale_w) / (float(self.input_quantizer.scale) * 2 ** 30)
        return torch.maximum(scale_w, floor if scale_w.numel() > 1 else floor.max())

    def record(self) -> LayerRecord:
        scale_w = self.weight_scales().cpu()
        output = self.output_quantizer
        levels = self.weight_quantizer.levels
        return LayerRecord(scale_d=float(self.input_quantizer.scale), offset_d=int(self.input_quantizer.offset),
                           scale_w=tuple(scale_w.tolist()), offset_w=(0,) * scale_w.numel(),
                           scale_o=float(output.scale) if output is not None else None,
                           offset_o=int(output.offset) if output is not None else None,
                           nuq_levels=tuple(int(v) for v in levels.ravel()) if levels is not None else (),
                           tensor_balance_factor=tuple(self.balance.tolist()) if self.balance is not None else ())
