"""Quantization primitives and observers against independent numpy references."""
import math

import numpy as np
import pytest
import torch

from openamct.core.algorithms import HFMGObserver, IFMRObserver
from openamct.core.capture import fold_bn
from openamct.core.config import ActQuantParams
from openamct.core.primitives import act_qparams, fake_quant, weight_scales


def ref_act_qparams(lo, hi, asymmetric):
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if asymmetric:
        scale = np.float32((hi - lo) / 255)
        return float(scale), int(np.clip(np.round(-128 - lo / scale), -128, 127))
    levels = 128 if -lo > hi else 127
    return float(np.float32(max(-lo, hi) / levels)), 0


@pytest.mark.parametrize("lo,hi", [(0.0, 6.0), (-1.3, 2.2), (-3.0, 0.5), (0.2, 0.9), (-0.0, 0.0)])
@pytest.mark.parametrize("asymmetric", [True, False])
def test_act_qparams_matches_reference(lo, hi, asymmetric):
    scale, offset = act_qparams(lo, hi, 8, asymmetric)
    if hi - lo == 0:
        assert (scale, offset) == (1.0, -128 if asymmetric else 0)
        return
    assert scale == pytest.approx(ref_act_qparams(lo, hi, asymmetric)[0], rel=1e-6)
    assert offset == ref_act_qparams(lo, hi, asymmetric)[1]
    # the range ends map inside the int8 grid and zero is exact
    q = lambda v: np.clip(np.round(v / scale) + offset, -128, 127)
    assert (q(0.0) - offset) * scale == 0.0


def test_weight_scales_per_channel_and_tensor():
    w = torch.randn(5, 3, 3, 3)
    w[2] = -w[2].abs()  # a channel whose largest magnitude is negative uses 128 levels
    ref = np.abs(w.numpy().reshape(5, -1)).max(1) / np.where(
        -w.numpy().reshape(5, -1).min(1) > w.numpy().reshape(5, -1).max(1), 128, 127)
    np.testing.assert_allclose(weight_scales(w, 8, True).numpy(), ref, rtol=1e-6)
    whole = np.abs(w.numpy()).max() / (128 if -w.min() > w.max() else 127)
    np.testing.assert_allclose(weight_scales(w, 8, False).numpy(), [whole], rtol=1e-6)
    # ConvTranspose keeps output channels on axis 1
    wt = torch.randn(3, 4, 2, 2)
    np.testing.assert_allclose(weight_scales(wt, 8, True, axis=1).numpy(),
                               weight_scales(wt.transpose(0, 1), 8, True).numpy())


def test_fake_quant_is_on_grid_and_rounds_half_to_even():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, 300.0, -300.0])
    out = fake_quant(x, 1.0, 0, 8)
    assert out.tolist() == [0.0, 2.0, 2.0, -0.0, 127.0, -128.0]


def ref_ifmr(data, p, asymmetric, bounds=(-math.inf, math.inf)):
    """Spec 4.3, written plainly in numpy over all the data."""
    data = np.sort(data.astype(np.float32))
    n = data.size
    k = max(1, n - math.floor(p.max_percentile * n))
    max_init = min(max(float(data[n - k]), 0.0), bounds[1])
    k = max(1, n - math.floor(p.min_percentile * n))
    min_init = max(min(float(data[k - 1]), 0.0), bounds[0])
    if not asymmetric:
        max_init = max(max_init, -min_init)
    best, best_clip = np.inf, None
    for r in np.arange(p.search_range[0], p.search_range[1], p.search_step):
        clip_max = min(max_init * r, bounds[1])
        clip_min = min_init if asymmetric else -clip_max
        scale = ref_act_qparams(clip_min, clip_max, asymmetric)[0]
        q = np.round(np.clip(data, clip_min, clip_max) / np.float32(scale)) * np.float32(scale)
        loss = np.mean((q - data) ** 2)
        if loss < best:
            best, best_clip = loss, clip_max
    return (min_init if asymmetric else -best_clip), best_clip


@pytest.mark.parametrize("asymmetric", [True, False])
@pytest.mark.parametrize("percentile", [0.999999, 0.99])
def test_ifmr_matches_numpy_reference(asymmetric, percentile):
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randn(4, 8, 10, 10, generator=gen) * 2 + 0.5, torch.randn(4, 8, 10, 10, generator=gen)]
    params = ActQuantParams(max_percentile=percentile, min_percentile=percentile)
    observer = IFMRObserver(params, asymmetric, batch_num=2)
    for b in batches:
        observer.observe(b)
    got = observer.compute()
    want = ref_ifmr(torch.cat(batches).numpy().ravel(), params, asymmetric)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_ifmr_respects_producer_bounds():
    data = torch.rand(2, 1000) * 6.0
    data[0, 0] = 6.0
    observer = IFMRObserver(ActQuantParams(), True, batch_num=1)
    observer.observe(data)
    clip_min, clip_max = observer.compute((0.0, 6.0))
    assert clip_min == 0.0 and clip_max <= 6.0
    assert (clip_min, clip_max) == pytest.approx(ref_ifmr(data.numpy().ravel(), ActQuantParams(), True, (0.0, 6.0)))


def test_ifmr_large_batches_stay_bounded_and_close():
    """Past max_samples the observer subsamples: memory stays bounded, the result stays close to exact."""
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(64, 64, 32, generator=gen).abs() for _ in range(4)]
    exact = ref_ifmr(torch.cat(batches).numpy().ravel(), ActQuantParams(), True)
    observer = IFMRObserver(ActQuantParams(), True, batch_num=4, max_samples=2 ** 14)
    for b in batches:
        observer.observe(b)
    assert sum(s.numel() for s in observer.samples) <= 2 ** 14
    data = torch.cat(batches).numpy().ravel()
    assert quant_mse(data, *observer.compute()) <= 1.02 * quant_mse(data, *exact)


def test_observers_name_the_layer_on_bad_batches():
    for cls in (IFMRObserver, HFMGObserver):
        observer = cls(ActQuantParams(), True, 1, layer="block.conv")
        with pytest.raises(ValueError, match="block.conv.*empty"):
            observer.observe(torch.empty(0))
        with pytest.raises(ValueError, match="block.conv.*NaN"):
            observer.observe(torch.tensor([1.0, float("nan")]))


def quant_mse(data, lo, hi):
    scale, offset = ref_act_qparams(lo, hi, True)
    q = np.clip(np.round(data / scale) + offset, -128, 127)
    return np.mean(((q - offset) * scale - data) ** 2)


def test_hfmg_merges_batches_like_one_histogram():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(20000, generator=gen), torch.randn(20000, generator=gen) * 3 + 1
    merged = HFMGObserver(ActQuantParams(act_algo="hfmg", num_of_bins=1024), True, 2)
    merged.observe(a)
    merged.observe(b)
    whole = np.histogram(torch.cat([a, b]).numpy(), 1024, (merged.lo, merged.hi))[0]
    assert merged.hist.sum() == pytest.approx(40000)
    # rebinning spreads counts within bins, so compare smoothed shapes
    smooth = lambda h: np.convolve(h, np.ones(16), "valid")
    assert np.abs(smooth(merged.hist) - smooth(whole)).max() < 0.05 * smooth(whole).max()


def test_hfmg_window_is_near_the_best_on_the_data():
    """The window HFMG picks from the histogram quantizes the real data almost as well as a brute-force search."""
    data = torch.from_numpy(np.random.default_rng(0).standard_t(3, 100000).astype(np.float32))  # heavy tails
    observer = HFMGObserver(ActQuantParams(act_algo="hfmg", num_of_bins=2048), True, 1)
    observer.observe(data)
    lo, hi = observer.compute()
    x = data.numpy()
    chosen = quant_mse(x, lo, hi)
    brute = min(quant_mse(x, -c, c) for c in np.linspace(0.5, float(np.abs(x).max()), 200))
    assert chosen <= 1.1 * brute
    assert chosen <= quant_mse(x, x.min(), x.max())


def test_fold_bn_matches_conv_then_bn():
    conv = torch.nn.Conv2d(3, 4, 3, bias=False)
    bn = torch.nn.BatchNorm2d(4, eps=1e-3).eval()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = bn(conv(x))
        assert fold_bn(conv, bn)
        np.testing.assert_allclose(conv(x).numpy(), want.numpy(), atol=1e-5)


@pytest.mark.parametrize("layer", [
    torch.nn.Linear(48, 16),
    torch.nn.Conv2d(8, 16, 3, padding=1),
    torch.nn.Conv2d(16, 16, 3, stride=2, padding="valid", groups=16),  # depthwise: one Hessian per channel
    torch.nn.Conv2d(16, 16, 5, padding="same", groups=16),
], ids=["linear", "conv", "depthwise", "depthwise-same"])
def test_gptq_output_error_below_nearest_rounding(layer):
    """4-bit weights: GPTQ's choice gives a smaller output error on the calibration data than nearest rounding,
    with the same scales (so only the rounding differs)."""
    import openamct
    from openamct.core.config import LayerConfig, QuantConfig, WeightQuantParams
    torch.manual_seed(0)
    model = torch.nn.Sequential(layer).eval()
    channels = layer.in_features if isinstance(layer, torch.nn.Linear) else layer.in_channels
    mix = torch.randn(channels, channels) / channels ** 0.5  # correlated inputs, as real activations are,
    if isinstance(layer, torch.nn.Linear):                   # across channels and (images) across pixels
        x = torch.randn(64, channels) @ mix + 0.5
    else:
        smooth = torch.nn.functional.interpolate(torch.randn(8, channels, 6, 6), size=(12, 12), mode="bilinear")
        x = (smooth.movedim(1, -1) @ mix + 0.5).movedim(-1, 1)
    errors = {}
    for rounding in ("nearest", "gptq"):
        weight = WeightQuantParams(num_bits=4, rounding=rounding, bias_correction=False)
        config = QuantConfig(layers={"0": LayerConfig(weight=weight)}, batch_num=1)
        qmodel = openamct.quantize(model, config, lambda m: [m(x)], x[:1])
        quantized = qmodel[0]
        with torch.no_grad():
            wq = quantized.weight_quantizer(quantized.layer.weight)
            out = torch.func.functional_call(layer, {"weight": wq}, (x,))
            errors[rounding] = float(((out - layer(x)) ** 2).mean())
        # the ARQ scale recomputed from the chosen weights is the one used (QAT's arq_retrain starts from them)
        torch.testing.assert_close(weight_scales(quantized.layer.weight, 4, True, quantized.axis),
                                   quantized.weight_quantizer.scales(quantized.layer.weight), rtol=1e-6, atol=0)
    assert errors["gptq"] < 0.8 * errors["nearest"], errors


@pytest.mark.parametrize("batches", [1, 48], ids=["one-batch", "one-sample-batches"])
def test_gptq_damping_is_cross_validated_against_overfitting(monkeypatch, batches):
    """A Linear with more inputs than calibration samples: GPTQ at the smallest damping fits the calibration samples,
    directions new samples do not share included. The damping cross-validated over the halves of the calibration
    data is larger there, and the output error on new samples lower. The halves are the two halves of each batch,
    or alternate batches where a batch holds one sample."""
    import openamct
    from openamct.core.algorithms import gptq
    from openamct.core.config import LayerConfig, QuantConfig, WeightQuantParams
    torch.manual_seed(0)
    layer = torch.nn.Linear(96, 24)
    mix = torch.randn(96, 96) / 96 ** 0.5
    calibration, fresh = torch.randn(48, 96) @ mix, torch.randn(4096, 96) @ mix
    config = QuantConfig(layers={"0": LayerConfig(weight=WeightQuantParams(num_bits=4, bias_correction=False))},
                         batch_num=batches)
    model = torch.nn.Sequential(layer).eval()

    def fresh_error():
        quantized = openamct.quantize(model, config, lambda m: [m(b) for b in calibration.chunk(batches)],
                                      calibration[:1])[0]
        with torch.no_grad():
            return float(((quantized(fresh) - layer(fresh)) ** 2).mean())

    chosen = []
    solve = gptq.gptq_layers
    monkeypatch.setattr(gptq, "gptq_layers", lambda *args, damp=gptq.DAMP, **kw: (
        chosen.append(damp), solve(*args, damp=damp, **kw))[1])
    cross_validated = fresh_error()
    assert max(chosen[-1]) > gptq.DAMP  # the final solve, with the damping chosen
    monkeypatch.setattr(gptq, "DAMPINGS", (gptq.DAMP,))
    assert cross_validated < 0.9 * fresh_error()


def test_gptq_keeps_the_weights_that_set_the_scale():
    """The largest weight of each channel sits on an input that is always 0 in the calibration data: GPTQ keeps it
    (zeroing it, as the GPTQ paper does for dead inputs, would change the ARQ scale recomputed from the weights
    and drop a weight other data may need)."""
    import openamct
    from openamct.core.config import LayerConfig, QuantConfig, WeightQuantParams
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8)
    with torch.no_grad():
        layer.weight[:, 3] = 2.0
    x = torch.randn(64, 16)
    x[:, 3] = 0.0
    config = QuantConfig(layers={"0": LayerConfig(weight=WeightQuantParams(rounding="gptq"))}, batch_num=1)
    quantized = openamct.quantize(torch.nn.Sequential(layer).eval(), config, lambda m: [m(x)], x[:1])[0]
    weight = quantized.layer.weight.detach()
    torch.testing.assert_close(weight[:, 3], torch.full((8,), 2.0))
    torch.testing.assert_close(weight_scales(weight), quantized.weight_quantizer.scales(weight), rtol=1e-6, atol=0)


@pytest.mark.parametrize("depthwise", [False, True], ids=["dense", "depthwise"])
def test_scale_refit_lowers_the_output_error_and_keeps_the_codes(depthwise):
    """4-bit GPTQ codes, then each channel's scale refitted: the output error on the calibration data drops, the
    codes are those GPTQ chose, each scale moves at most 10 %, and ARQ recomputed from the weights gives the new
    scales (QAT's arq_retrain starts from them)."""
    from openamct.core.algorithms.gptq import gptq, gptq_depthwise
    from openamct.core.algorithms.scale_refit import refit_scales
    from openamct.core.config import WeightQuantParams
    from openamct.core.quantizers import WeightQuantizer
    gen = torch.Generator().manual_seed(0)
    channels, taps = 16, 9
    x = torch.randn(4096, 4, generator=gen) @ torch.randn(4, taps if depthwise else 32, generator=gen)
    hessian = (x.t() @ x / len(x)).double()
    if depthwise:  # one Hessian per channel, each from its own data
        hessian = torch.stack([hessian * (1 + 0.1 * c) for c in range(channels)])
    weight = torch.randn(channels, taps if depthwise else 32, generator=gen)
    quantizer = WeightQuantizer(WeightQuantParams(num_bits=4), axis=0)
    quantizer.fixed_scales = old_scales = quantizer.scales(weight)
    chosen = (gptq_depthwise if depthwise else gptq)(weight, hessian, quantizer)

    def output_error(w):
        delta = (w - weight).double()
        return float(torch.einsum("ci,cij,cj->", delta, hessian, delta) if depthwise else
                     torch.einsum("ci,ij,cj->", delta, hessian, delta))

    refitted = refit_scales(weight, chosen, hessian, quantizer)
    assert output_error(refitted) < 0.97 * output_error(chosen)
    new_scales = quantizer.fixed_scales
    assert not torch.equal(new_scales, old_scales) and ((new_scales / old_scales - 1).abs() <= 0.1 + 1e-6).all()
    torch.testing.assert_close(refitted / new_scales[:, None], chosen / old_scales[:, None], rtol=0, atol=1e-4)
    torch.testing.assert_close(weight_scales(refitted, 4, True, 0), new_scales, rtol=1e-6, atol=0)


class _PadInForward(torch.nn.Conv2d):
    """A conv that pads in its forward by amounts it computes from the input's shape (as ports of TF's "same"
    padding do): the core cannot see the padding in the module's attributes."""

    def forward(self, x):
        total = [max((-(-size // s) - 1) * s + k - size, 0)
                 for size, s, k in zip(x.shape[2:], self.stride, self.kernel_size)]
        pads = [total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2]
        x = torch.nn.functional.pad(x, pads)
        return torch.nn.functional.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


@pytest.mark.parametrize("groups", [1, 4])
def test_gptq_hessian_sees_padding_done_in_forward(groups):
    """GPTQ's statistics come from what the conv kernel reads, so a conv padding in its forward gets the Hessian
    of the same conv with the padding as an attribute."""
    from openamct.core.algorithms import gptq
    torch.manual_seed(0)
    static = torch.nn.Conv2d(4, 4, 3, padding=1, groups=groups)
    dynamic = _PadInForward(4, 4, 3, groups=groups)
    dynamic.load_state_dict(static.state_dict())
    x = torch.randn(2, 4, 6, 6)

    def hessian(layer):
        with gptq.KernelInput() as kernel:
            layer(x)
        return gptq.hessian(layer, x, kernel.call, rows=10 ** 9)

    expected = hessian(static)
    assert expected.shape == ((36, 36) if groups == 1 else (4, 9, 9))
    torch.testing.assert_close(hessian(dynamic), expected)
    assert not torch.equal(expected, gptq.hessian(static, x, {"input": x, "padding": 0}, rows=10 ** 9))


def _unfold_hessian(layer, x, padding):
    """The reference: E[p p^T] over every patch F.unfold gives (per channel for a depthwise conv)."""
    if padding == "valid":
        padding = 0
    elif padding == "same":
        total = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size)]
        x = torch.nn.functional.pad(x, [p for t in reversed(total) for p in (t // 2, t - t // 2)])
        padding = 0
    patches = torch.nn.functional.unfold(x, layer.kernel_size, layer.dilation, padding, layer.stride)
    if layer.groups == 1:
        rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        return rows.t() @ rows / len(rows)
    per_channel = patches.reshape(x.shape[0], x.shape[1], -1, patches.shape[-1])
    return torch.einsum("ncil,ncjl->cij", per_channel, per_channel) / (x.shape[0] * patches.shape[-1])


@pytest.mark.parametrize("groups", [1, 6])
@pytest.mark.parametrize("kernel,stride,dilation,padding", [
    (3, 1, 1, 1), (3, 2, 1, 1), (5, 2, 1, (2, 1)), (3, 1, 2, "same"), (4, 1, 1, "same"), (3, 2, 1, "valid"),
    (1, 1, 1, 0)])
def test_gptq_hessian_from_gathered_patches_equals_unfold(groups, kernel, stride, dilation, padding):
    """The Hessian gathered tap by tap (padding read as zeros, not materialised) is F.unfold's, at every position;
    sampled positions estimate it, the same ones on every run."""
    from openamct.core.algorithms import gptq
    torch.manual_seed(0)
    layer = torch.nn.Conv2d(6, 6, kernel, stride, padding=padding, dilation=dilation, groups=groups)
    x = torch.randn(3, 6, 11, 9)
    call = {"input": x, "padding": padding}
    expected = _unfold_hessian(layer, x, padding)
    torch.testing.assert_close(gptq.hessian(layer, x, call, rows=10 ** 9), expected, rtol=1e-5, atol=1e-6)
    nhwc = x.to(memory_format=torch.channels_last)
    torch.testing.assert_close(gptq.hessian(layer, nhwc, {"input": nhwc, "padding": padding}, rows=10 ** 9),
                               expected, rtol=1e-5, atol=1e-6)
    sampled = [gptq.hessian(layer, x, call, rows=3 * 10, generator=torch.Generator().manual_seed(seed))
               for seed in [0, 0] + list(range(1, 64))]
    assert torch.equal(sampled[0], sampled[1])
    error = [float((h - expected).norm() / expected.norm()) for h in (sampled[0], torch.stack(sampled).mean(0))]
    assert error[1] < 0.35 * error[0], error  # unbiased: the mean of many samples closes in on it
