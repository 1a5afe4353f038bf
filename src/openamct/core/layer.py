"""The quantized layer of a calibration/simulation model: a float layer plus its quantizers, the statistics its
weight algorithms need, and the pipeline that runs them after calibration.

While calibrating, a layer records each input channel's mean and mean square (bias correction, NUQ's level fit)
and, where GPTQ runs, the Hessian of its kernel's input. `weights.finish_weights` then runs the weight algorithms
that `weights.weight_pipeline` names for the layer's config; the chosen weights replace the float ones. Once
calibrated, the layer computes as the deployed model does (`_integer_forward`).
"""
import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from . import log
from .algorithms import dmq, gptq
from .config import LayerConfig
from .primitives import channel_view, quantize_bias, round_ste, straight_through
from .quantizers import ActQuantizer, WeightQuantizer
from .simulation import Accumulator, active_mode
from .weights import HESSIAN_STEPS, WeightJob, weight_pipeline


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
        # set by the export where the INT8 kernel is the slower (onnx_export/fallback.py): the layer runs in float,
        # its output not quantized, and, with float_input, its input (a model input no INT8 layer reads) not either
        self.deploy_float = self.float_input = False
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
            split = fine and "gptq" in self.pipeline
            for fold, part, part_call in _halves(x, call, self._batches) if split else [(0, x, call)]:
                hessian = gptq.hessian(self.layer, part, part_call, -(-rows * len(part) // len(x)), self._generator)
                if hessian is None:
                    return
                if self.hessian is None:
                    self.hessian = hessian.new_zeros((2 if split else 1,) + hessian.shape)
                self.hessian[fold] += hessian  # in place, as the moments
                self._fold_batches[fold] += 1

    def weight_job(self) -> WeightJob | None:
        """After calibration: what the weight pipeline works on (None where no statistics were collected); the
        statistics are handed over."""
        self._weight_cache = None
        if self.input_moments is None:
            return None
        mean, power = (self.input_moments / self._batches).to(self.layer.weight.device)
        folds = hessian = None
        if self.hessian is not None:
            hessian = (self.hessian[0] if len(self.hessian) == 1 else self.hessian.sum(0)).div_(sum(self._fold_batches))
            if min(self._fold_batches):  # each half's mean, in place: no third copy
                folds = [self.hessian[i].div_(count) for i, count in enumerate(self._fold_batches)]
        self.input_moments = self.hessian = None
        return WeightJob(self.name, self.layer, self.weight_quantizer, self.pipeline, mean, power, hessian, folds)

    def keep(self, job: WeightJob) -> None:
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
        elif self.deploy_float:  # deployed in float, being faster so (onnx_export/fallback.py)
            return self.layer(x if self.float_input else self.input_quantizer(x))
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
