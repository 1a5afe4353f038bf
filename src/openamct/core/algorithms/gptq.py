"""GPTQ (Frantar et al. 2023): weights on the quantizer's grid chosen column by column, each column's rounding
error pushed onto the columns not yet quantized through the inverse Hessian E[x x^T] of the layer's input, so the
layer's output error on the calibration data, not the weight error, is what is minimised.

The Hessian is accumulated from what the layer's kernel actually reads: `KernelInput` records the input (and
padding) of the conv2d call inside the layer's forward, so a conv that pads in its forward (TF "same" padding,
padding computed at run time) gets the statistics of its padded input without the core knowing its class.
"""
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..primitives import qrange

# Input vectors a layer's Hessian samples over the whole calibration: ROWS_PER_COLUMN per weight column (of its
# column group), within [MIN_ROWS, MAX_ROWS], and fewer where the Hessian's products would cost more than
# HESSIAN_MACS multiply-adds
ROWS_PER_COLUMN = 16
MIN_ROWS, MAX_ROWS = 2 ** 11, 2 ** 14
HESSIAN_MACS = 2 ** 32
# Wider layers are solved in column groups of at most this many columns, each with its own block of the Hessian
# (the blocks off the diagonal are not estimated): a K x K Cholesky costs K^3, and the few thousand sampled rows
# that are affordable cannot estimate a full Hessian of a 3 x 3 conv over 512 channels (K = 4608) anyway
MAX_GROUP = 1280
# Below 8 bits, and for NUQ codebooks, rounding errors are larger and the codebook fit reads the Hessian too: a
# sample this many times larger
FINE_SAMPLE = 16

# GPTQ's damping: this share of the Hessian's mean diagonal added to its diagonal. The Hessian is estimated from a
# few hundred images; where the layer has many columns for the positions those images hold (the wide 1x1 convs on
# small late maps, a classifier that sees one vector per image), GPTQ at DAMP fits directions of the estimate that
# new images do not share, and below 8 bits the output error on them comes out several times the calibration
# error. So there each layer's damping is chosen from DAMPINGS by cross-validation over the two halves of the
# calibration images (choose_damping; at 8 bits the rounding errors are too small for it to pay its time)
DAMP = 0.01
DAMPINGS = (0.01, 0.03, 0.1, 0.3, 1.0)

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


def _padding(layer: nn.Conv2d, padding) -> tuple[int, int]:
    """The zero padding (top, left) before the input of the call's `padding` (PyTorch's "same" puts the extra
    pixel after)."""
    if padding == "valid":
        return 0, 0
    if padding == "same":
        return tuple(d * (k - 1) // 2 for d, k in zip(layer.dilation, layer.kernel_size))
    return (padding, padding) if isinstance(padding, int) else tuple(padding)


def _sample(total: int, count: int, generator: torch.Generator | None) -> torch.Tensor | None:
    """`count` distinct indices of range(total), sorted (None: all of them)."""
    if count >= total:
        return None
    return torch.randperm(total, generator=generator)[:count].sort().values


def _patches(x: torch.Tensor, layer: nn.Conv2d, padding, count: int, generator) -> torch.Tensor:
    """The kernel's input patches at `count` output positions of each image, drawn uniformly and independently per
    image (all positions where there are fewer): [N, positions, kh * kw, C]. One gather along the map (each
    channel's, or each pixel's channels in channels_last), so the cost follows the sample, not the map (F.unfold,
    or padding, would copy all of it); taps in the padding read zero."""
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
    top, left = _padding(layer, padding)
    batch, channels, height, width = x.shape
    bottom = (height + 2 * top - dh * (kh - 1) - 1) // sh + 1 if padding != "same" else height
    right = (width + 2 * left - dw * (kw - 1) - 1) // sw + 1 if padding != "same" else width
    if count >= bottom * right:
        position = torch.arange(bottom * right).expand(batch, -1)
    else:
        position = torch.randint(bottom * right, (batch, count), generator=generator)
    rows = ((position // right) * sh - top)[..., None] + torch.tensor([i * dh for i in range(kh) for _ in range(kw)])
    cols = ((position % right) * sw - left)[..., None] + torch.tensor([j * dw for _ in range(kh) for j in range(kw)])
    inside = ((rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)).reshape(batch, -1).to(x)
    index = (rows.clamp(0, height - 1) * width + cols.clamp(0, width - 1)).reshape(batch, -1).to(x.device)
    shape = (batch, position.shape[1], kh * kw, channels)
    if x.is_contiguous():
        maps = x.reshape(batch, channels, height * width)
        gathered = maps.gather(2, index[:, None, :].expand(-1, channels, -1)) * inside[:, None, :]
        return gathered.reshape(batch, channels, -1).transpose(1, 2).reshape(shape)
    pixels = x.permute(0, 2, 3, 1).reshape(batch, height * width, channels)  # a view in channels_last
    return (pixels.gather(1, index[:, :, None].expand(-1, -1, channels)) * inside[:, :, None]).reshape(shape)


def is_depthwise(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Conv2d) and 1 < layer.groups == layer.in_channels == layer.out_channels


def supported(layer: nn.Module) -> bool:
    """GPTQ runs on Linear, Conv2d with groups 1, and depthwise Conv2d (each channel a layer of its own)."""
    return isinstance(layer, nn.Linear) or (isinstance(layer, nn.Conv2d) and layer.groups == 1) or is_depthwise(layer)


def column_groups(columns: int) -> list[slice]:
    """The weight's columns in balanced contiguous groups of at most MAX_GROUP (input channels with their taps)."""
    size = -(-columns // -(-columns // MAX_GROUP))
    return [slice(start, min(start + size, columns)) for start in range(0, columns, size)]


def hessian_rows(columns: int, batches: int, fine: bool = False) -> int:
    """Input vectors a layer's Hessian samples per calibration batch (see ROWS_PER_COLUMN; FINE_SAMPLE times more
    where `fine`)."""
    scale = FINE_SAMPLE if fine else 1
    width = min(columns, MAX_GROUP)
    total = scale * min(MAX_ROWS, ROWS_PER_COLUMN * width, HESSIAN_MACS // (columns * width))
    return -(-max(scale * MIN_ROWS, total) // max(1, batches))


def _second_moment(vectors: torch.Tensor) -> torch.Tensor:
    """E[v v^T] of the rows of `vectors`, on the diagonal blocks of the column groups only (zero elsewhere)."""
    groups = column_groups(vectors.shape[1])
    if len(groups) == 1:
        return vectors.t() @ vectors / len(vectors)
    moment = vectors.new_zeros(vectors.shape[1], vectors.shape[1])
    for group in groups:
        moment[group, group] = vectors[:, group].t() @ vectors[:, group] / len(vectors)
    return moment


def hessian(layer: nn.Module, x: torch.Tensor, call: dict | None, rows: int,
            generator: torch.Generator | None = None) -> torch.Tensor | None:
    """GPTQ's E[x x^T] over the weight's columns for one batch, from about `rows` input vectors (a conv's patches
    at sampled output positions, a Linear's sampled tokens): [K, K] (block-diagonal over column_groups) for
    Linear and Conv2d with groups 1, one [kh * kw, kh * kw] per channel for a depthwise Conv2d: [C, K, K]. `x` is
    the layer's input and `call` the conv2d call its forward made (KernelInput). None for the layers GPTQ does not
    support.

    The statistic is an average, so a uniform sample of positions estimates it without the cost of every
    position's patch (a k x k conv's patches are k * k times its input)."""
    if isinstance(layer, nn.Linear):
        vectors = x.reshape(-1, x.shape[-1])
        chosen = _sample(len(vectors), rows, generator)
        return _second_moment(vectors if chosen is None else vectors[chosen.to(x.device)])
    if not supported(layer) or call is None:
        return None
    x = call["input"].detach().float()
    patches = _patches(x, layer, call.get("padding", 0), -(-rows // x.shape[0]), generator)
    if layer.groups == 1:  # [N * positions, C * kh * kw], F.unfold's column order
        return _second_moment(patches.permute(0, 1, 3, 2).reshape(-1, patches.shape[3] * patches.shape[2]))
    per_channel = patches.permute(3, 2, 0, 1).reshape(patches.shape[3], patches.shape[2], -1).contiguous()  # [C, K, n]
    return torch.bmm(per_channel, per_channel.transpose(1, 2)) / per_channel.shape[2]


def _column_quantizer(weights: list, quantizers: list, device, dtype=torch.float64):
    """column ([layers, out channels], one value per output channel of each layer) -> its dequantized values on
    each layer's grid (and codebook: the layers must then share one quantizer, as choose_damping's solves of one
    layer do)."""
    scale = torch.stack([q.scales(w).to(device, dtype).expand(w.shape[0]) for w, q in zip(weights, quantizers)])
    table = quantizers[0].table.to(device, dtype) if quantizers[0].table is not None else None
    if table is not None and any(q is not quantizers[0] for q in quantizers):
        raise ValueError("NUQ layers are solved one at a time")
    rows = torch.arange(scale.shape[1], device=device) if table is not None and table.shape[0] > 1 else \
        torch.zeros(scale.shape[1], dtype=torch.long, device=device)
    qmin, qmax = qrange(quantizers[0].params.num_bits)

    def quantize_column(column):
        codes = torch.clamp(torch.round(column / scale), qmin, qmax)
        if table is not None:
            codes = table[rows, codes.long() + 128]
        return codes * scale
    return quantize_column


def _damped(hessian: torch.Tensor, damp) -> torch.Tensor:
    """hessian (float64, [..., K, K]) with damp * mean diagonal added (`damp`: a number, or one per matrix of a
    [layers, K, K] stack), and 1 on the diagonal of inputs that were always 0: their weights are then rounded to
    nearest and kept (not zeroed: other data may reach them)."""
    h = hessian.double().clone()
    diagonal = torch.diagonal(h, dim1=-2, dim2=-1)
    diagonal[diagonal == 0] = 1.0
    damp = torch.as_tensor(damp, dtype=h.dtype, device=h.device)
    diagonal += (damp[:, None] if damp.dim() else damp) * diagonal.mean(-1, keepdim=True)
    return h


def _inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """U, upper triangular, with h^-1 = U^T U ([..., K, K]): the inverse of the Cholesky factor of h with its rows
    and columns reversed, reversed back (J h J = M M^T gives h^-1 = (J M^-1 J)^T (J M^-1 J)). One factorisation and
    one triangular inverse: half the work of factorising h, inverting it and factorising the inverse."""
    lower = torch.linalg.cholesky(h.flip(-1, -2))
    eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device).expand_as(h)
    return torch.linalg.solve_triangular(lower, eye, upper=False).flip(-1, -2)


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
         damp: float = DAMP) -> torch.Tensor:
    """Weights on the quantizer's grid chosen column by column, each column's error pushed onto the columns not
    yet quantized through the inverse Hessian E[x x^T] (Frantar et al. 2023, GPTQ): the layer's output error on
    the calibration data, not the weight error, is what is minimised. Each column group (column_groups) is solved
    with its block of the Hessian. Returns dequantized weights."""
    return gptq_layers([weight], [hessian], [quantizer], block, damp)[0]


def gptq_layers(weights: list, hessians: list, quantizers: list, block: int = 128, damp=DAMP) -> list:
    """gptq() of layers whose weights have one shape, all in one column loop: the same choices as one call each,
    in far fewer (larger) tensor operations, which is what GPTQ's time goes to on a CPU. `damp`: one for all, or a
    list with one per layer."""
    shape = weights[0].shape
    w = torch.stack([x.detach().float().reshape(shape[0], -1) for x in weights])  # float32
    kept = torch.stack([_extremes(x, q.params.channel_wise) for x, q in zip(w, quantizers)])
    quantize_column = _column_quantizer(weights, quantizers, w.device, w.dtype)
    out = torch.empty_like(w)
    for group in column_groups(w.shape[2]):
        h = torch.stack([x.to(w.device)[group, group] for x in hessians])
        out[:, :, group] = _solve(w[:, :, group], h, kept[:, :, group], quantize_column, block, damp)
    return [o.reshape(shape).to(x.dtype) for o, x in zip(out, weights)]


def _solve(w: torch.Tensor, hessian: torch.Tensor, kept: torch.Tensor, quantize_column, block: int,
           damp) -> torch.Tensor:
    """GPTQ on the columns of `w` ([layers, out, columns]) with their Hessians ([layers, columns, columns]), lazily
    updated `block` columns at a time; the `kept` weights stay as they are."""
    h = _damped(hessian, damp)
    order = torch.argsort(torch.diagonal(h, dim1=-2, dim2=-1), dim=-1, descending=True)  # what matters most first
    layers = torch.arange(len(w), device=w.device)[:, None]
    w, kept = w.gather(2, order[:, None, :].expand_as(w)), kept.gather(2, order[:, None, :].expand_as(kept))
    h = h[layers[:, :, None], order[:, :, None], order[:, None, :]]
    original = w.clone()
    try:  # in float32, as GPTQ factorises (twice as fast as float64; the damping keeps h well conditioned) ...
        upper = _inverse_cholesky(h.to(w.dtype))
    except torch.linalg.LinAlgError:  # ... and in float64 where float32 loses positive definiteness
        upper = _inverse_cholesky(h).to(w.dtype)
    out = torch.zeros_like(w)
    for start in range(0, w.shape[2], block):
        end = min(start + block, w.shape[2])
        w1, errors = w[:, :, start:end].clone(), torch.zeros_like(w[:, :, start:end])
        for k in range(end - start):
            # a kept weight is taken as it was: the updates of earlier columns do not move it
            column = torch.where(kept[:, :, start + k], original[:, :, start + k], w1[:, :, k])
            q = quantize_column(column)
            out[:, :, start + k] = q
            error = (column - q) / upper[:, start + k, start + k, None]
            w1[:, :, k + 1:].baddbmm_(error[:, :, None], upper[:, start + k, None, start + k + 1:end], alpha=-1)
            errors[:, :, k] = error
        w[:, :, end:].baddbmm_(errors, upper[:, start:end, end:], alpha=-1)
    return out.gather(2, torch.argsort(order, dim=-1)[:, None, :].expand_as(out))


def gptq_depthwise(weight: torch.Tensor, hessians: torch.Tensor, quantizer,
                   damp: float = DAMP) -> torch.Tensor:
    """GPTQ for a depthwise conv: each output channel is a layer of its own, its kh * kw weights seeing only its
    input channel's patches, so every channel has its own Hessian ([C, K, K]) and all channels run as a batch."""
    shape = weight.shape
    w = weight.detach().double().reshape(shape[0], -1).clone()
    h = _damped(hessians.to(w.device), damp)
    upper = _inverse_cholesky(h)
    quantize_column = _column_quantizer([weight], [quantizer], w.device)
    kept, original = _extremes(w, quantizer.params.channel_wise), w.clone()
    out = torch.zeros_like(w)
    for k in range(w.shape[1]):
        out[:, k] = quantize_column(w[:, k][None])[0]
        error = (w[:, k] - out[:, k]) / upper[:, k, k]
        w[:, k:] -= error[:, None] * upper[:, k, k:]
        w = torch.where(kept, original, w)
    return out.reshape(shape).to(weight.dtype)


def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Per output channel, the layer's output error tr(d H d^T) of the weight change `delta` ([out, ...]) under
    the Hessian ([K, K], or [C, K, K] for a depthwise conv)."""
    d = delta.detach().double().reshape(delta.shape[0], -1)
    h = hessian.to(d.device).double()
    product = d @ h if h.dim() == 2 else torch.bmm(d[:, None, :], h)[:, 0]
    return (product * d).sum(1)


def choose_damping(solve, weights: list, folds: list, quantizers: list) -> list:
    """Per layer, the damping of DAMPINGS whose solution, fitted on one half of the calibration images' Hessian,
    has the least output error under the other half's, summed both ways round. `solve(weights, hessians,
    quantizers, damps)` returns the chosen weights of each entry (gptq_layers' form: the entries are solved
    together, which is what makes the ten solves of a layer cheap); `folds`: per layer, the Hessians of the two
    halves."""
    entries = [(row, damp, fit) for damp in DAMPINGS for fit in (0, 1) for row in range(len(weights))]
    errors = torch.zeros(len(weights), len(DAMPINGS), dtype=torch.float64)
    size = max(2 * len(weights), 2 * len(DAMPINGS))
    for start in range(0, len(entries), size):
        chunk = entries[start:start + size]
        chosen = solve([weights[row] for row, _, _ in chunk], [folds[row][fit] for row, _, fit in chunk],
                       [quantizers[row] for row, _, _ in chunk], [damp for _, damp, _ in chunk])
        for (row, damp, fit), choice in zip(chunk, chosen):
            error = output_error(choice - weights[row], folds[row][1 - fit]).sum()
            errors[row, DAMPINGS.index(damp)] += float(error.cpu())
    return [DAMPINGS[int(i)] for i in errors.argmin(1)]
