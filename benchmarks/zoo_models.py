"""The architecture zoo: the models users bring, written here (no torchvision), random weights seeded, except
EfficientNet-Lite0 with its real weights, written both ways (static padding and runtime TF "same" padding).

Every builder takes a size, "tiny" (a few channels, small inputs: the tests) or "full" (the real shapes: the
benchmark), and every model comes with its example inputs: `ZOO[name].example(batch, size)` returns a tuple of
model inputs. benchmarks/zoo.py measures them; tests/test_zoo.py runs the tiny ones through the AMCT flow.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from openamct.app.models import ResNet50, efficientnet_lite0
from openamct.app.models.efficientnet_lite import MBConvBlock, _bn, _same_conv
from openamct.app.models.resnet import Bottleneck


def _randomize_bn(model: nn.Module, seed: int = 1) -> nn.Module:
    """Random BN statistics, so folding BN into the convs changes the weights as a trained model's would."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_((torch.rand(m.num_features, generator=gen) - 0.5) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_((torch.rand(m.num_features, generator=gen) - 0.5) * 0.2)
    return model.eval()


def conv_bn(cin, cout, kernel, stride=1, groups=1, act: type[nn.Module] | None = nn.ReLU, dims=2):
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
    bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1]
    layers = [conv(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), bn(cout)]
    return nn.Sequential(*layers, *([act()] if act else []))


class Classifier(nn.Module):
    """features -> global average pool -> Linear: the head every image and clip classifier here shares."""

    def __init__(self, features: nn.Module, channels: int, classes: int = 1000):
        super().__init__()
        self.features, self.fc = features, nn.Linear(channels, classes)

    def forward(self, x):
        x = self.features(x)
        return self.fc(x.mean(tuple(range(2, x.dim()))))


class InvertedResidual(nn.Module):
    """MobileNetV2/V3 block: 1x1 expand, depthwise, optional squeeze-excite, 1x1 project, residual if shapes match."""

    def __init__(self, cin, mid, cout, kernel, stride, act=nn.ReLU6, se=False):
        super().__init__()
        layers = [conv_bn(cin, mid, 1, act=act)] if mid != cin else []
        layers.append(conv_bn(mid, mid, kernel, stride, groups=mid, act=act))
        if se:
            layers.append(SqueezeExcite(mid))
        layers.append(conv_bn(mid, cout, 1, act=None))
        self.body, self.residual = nn.Sequential(*layers), stride == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


class SqueezeExcite(nn.Module):
    """MobileNetV3's SE: pool, 1x1 reduce, ReLU, 1x1 expand, hardsigmoid, times the input."""

    def __init__(self, channels):
        super().__init__()
        squeezed = max(8, channels // 4)
        self.reduce, self.expand = nn.Conv2d(channels, squeezed, 1), nn.Conv2d(squeezed, channels, 1)

    def forward(self, x):
        scale = F.hardsigmoid(self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True)))))
        return x * scale


def mobilenet_v2(size):
    w = 1 if size == "full" else 0.25
    c = lambda n: max(8, int(n * w))
    layers, cin = [conv_bn(3, c(32), 3, 2, act=nn.ReLU6)], c(32)
    for expand, cout, repeats, stride in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                                          (6, 160, 3, 2), (6, 320, 1, 1)):
        for i in range(repeats if size == "full" else 1):
            layers.append(InvertedResidual(cin, cin * expand, c(cout), 3, stride if i == 0 else 1))
            cin = c(cout)
    layers.append(conv_bn(cin, c(1280), 1, act=nn.ReLU6))
    return Classifier(nn.Sequential(*layers), c(1280))


def mobilenet_v3(size):
    """MobileNetV3-Large's blocks (kernel, expansion, out, SE, hardswish, stride)."""
    w = 1 if size == "full" else 0.25
    c = lambda n: max(8, int(n * w))
    blocks = ((3, 16, 16, 0, 0, 1), (3, 64, 24, 0, 0, 2), (3, 72, 24, 0, 0, 1), (5, 72, 40, 1, 0, 2),
              (5, 120, 40, 1, 0, 1), (5, 120, 40, 1, 0, 1), (3, 240, 80, 0, 1, 2), (3, 200, 80, 0, 1, 1),
              (3, 184, 80, 0, 1, 1), (3, 184, 80, 0, 1, 1), (3, 480, 112, 1, 1, 1), (3, 672, 112, 1, 1, 1),
              (5, 672, 160, 1, 1, 2), (5, 960, 160, 1, 1, 1), (5, 960, 160, 1, 1, 1))
    if size != "full":
        blocks = blocks[::3]
    layers, cin = [conv_bn(3, c(16), 3, 2, act=nn.Hardswish)], c(16)
    for kernel, mid, cout, se, hs, stride in blocks:
        act = nn.Hardswish if hs else nn.ReLU
        layers.append(InvertedResidual(cin, c(mid), c(cout), kernel, stride, act, bool(se)))
        cin = c(cout)
    layers += [conv_bn(cin, c(960), 1, act=nn.Hardswish)]
    return Classifier(nn.Sequential(*layers), c(960))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, cout, 3, stride), conv_bn(cout, cout, 3, act=None))
        self.shortcut = conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.body(x) + self.shortcut(x))


def resnet18(size):
    widths = (64, 128, 256, 512) if size == "full" else (8, 16, 16, 32)
    layers, cin = [conv_bn(3, widths[0], 7, 2), nn.MaxPool2d(3, 2, 1)], widths[0]
    for i, width in enumerate(widths):
        layers += [BasicBlock(cin, width, 1 if i == 0 else 2), BasicBlock(width, width, 1)]
        cin = width
    return Classifier(nn.Sequential(*layers), cin)


def resnet50(size):
    if size == "full":
        return ResNet50()
    layers, cin = [conv_bn(3, 16, 3, 2)], 16
    for i, width in enumerate((4, 8)):
        layers.append(Bottleneck(cin, width, 1 if i == 0 else 2))
        cin = width * Bottleneck.expansion
    return Classifier(nn.Sequential(*layers), cin)


class ConvNeXtBlock(nn.Module):
    """7x7 depthwise, LayerNorm over channels (channels last), Linear 4x, GELU, Linear, residual."""

    def __init__(self, dim):
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm, self.up, self.down = nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        y = self.down(F.gelu(self.up(self.norm(self.dw(x).permute(0, 2, 3, 1)))))
        return x + y.permute(0, 3, 1, 2)


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (ConvNeXt's stem and downsampling)."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def convnext(size):
    dims, depths = ((96, 192, 384, 768), (2, 2, 6, 2)) if size == "full" else ((8, 16, 16, 32), (1, 1, 1, 1))
    layers = [nn.Conv2d(3, dims[0], 4, 4), ChannelNorm(dims[0])]
    for i, (dim, depth) in enumerate(zip(dims, depths)):
        if i:
            layers += [ChannelNorm(dims[i - 1]), nn.Conv2d(dims[i - 1], dim, 2, 2)]
        layers += [ConvNeXtBlock(dim) for _ in range(depth)]
    return Classifier(nn.Sequential(*layers), dims[-1])


class UNet(nn.Module):
    """Encoder (conv-BN-ReLU pairs, max pool), decoder (ConvTranspose2d up, bilinear Upsample at the top level,
    concat with the skip), per-pixel class logits."""

    def __init__(self, base, levels, classes=8):
        super().__init__()
        widths = [base * 2 ** i for i in range(levels)]
        self.down = nn.ModuleList()
        cin = 3
        for width in widths:
            self.down.append(nn.Sequential(conv_bn(cin, width, 3), conv_bn(width, width, 3)))
            cin = width
        self.up, self.merge = nn.ModuleList(), nn.ModuleList()
        for i in range(levels - 1, 0, -1):
            if i == 1:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear"),
                                             nn.Conv2d(widths[i], widths[i - 1], 1)))
            else:
                self.up.append(nn.ConvTranspose2d(widths[i], widths[i - 1], 2, 2))
            self.merge.append(nn.Sequential(conv_bn(2 * widths[i - 1], widths[i - 1], 3),
                                            conv_bn(widths[i - 1], widths[i - 1], 3)))
        self.head = nn.Conv2d(base, classes, 1)

    def forward(self, x):
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips[:-1])):
            x = merge(torch.cat([up(x), skip], 1))
        return self.head(x)


class Attention(nn.Module):
    """Multi-head self-attention written out: two MatMuls between activations (q·kᵀ and softmax·v)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5, -1)
        return self.proj((weights @ v).transpose(1, 2).reshape(n, t, d))


class TransformerBlock(nn.Module):
    """Pre-norm: x + attention(LN(x)), then x + MLP(LN(x)) with GELU."""

    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(dim), Attention(dim, heads), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """DeiT-tiny's layout: patch conv, class token, learned positions, pre-norm blocks, head on the class token."""

    def __init__(self, image, patch, dim, depth, heads, classes=1000):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


class BertEncoder(nn.Module):
    """BERT-style: token + position embeddings over int64 ids, LayerNorm, post-norm blocks, CLS classifier."""

    def __init__(self, vocab, seq, dim, depth, heads, classes=16):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, dim), nn.Embedding(seq, dim)
        self.norm = nn.LayerNorm(dim)
        self.blocks = nn.ModuleList(nn.ModuleList([Attention(dim, heads), nn.LayerNorm(dim), nn.Sequential(
            nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)), nn.LayerNorm(dim)]) for _ in range(depth))
        self.classifier = nn.Linear(dim, classes)

    def forward(self, ids):
        x = self.norm(self.tokens(ids) + self.positions(torch.arange(ids.shape[1], device=ids.device)))
        for attention, norm1, mlp, norm2 in self.blocks:
            x = norm1(x + attention(x))
            x = norm2(x + mlp(x))
        return self.classifier(torch.tanh(x[:, 0]))


def audio_net(size):
    """M5-style raw-waveform classifier: a wide strided Conv1d, then Conv1d-BN-ReLU stages with pooling."""
    widths = (128, 128, 256, 512) if size == "full" else (8, 8, 16, 16)
    layers = [conv_bn(1, widths[0], 79, 4, dims=1), nn.MaxPool1d(4)]
    for cin, cout in zip(widths, widths[1:]):
        layers += [conv_bn(cin, cout, 3, dims=1), conv_bn(cout, cout, 3, dims=1), nn.MaxPool1d(4)]
    return Classifier(nn.Sequential(*layers), widths[-1], 35)


def video_net(size):
    """R3D-style clip classifier: Conv3d-BN-ReLU stages, strided in space and (later) time."""
    widths = (32, 64, 128, 256) if size == "full" else (8, 8, 16, 16)
    layers = [conv_bn(3, widths[0], 3, (1, 2, 2), dims=3)]
    for cin, cout in zip(widths, widths[1:]):
        layers += [conv_bn(cin, cout, 3, 2, dims=3), conv_bn(cout, cout, 3, dims=3)]
    return Classifier(nn.Sequential(*layers), widths[-1], 400)


class RuntimeSameConv(nn.Conv2d):
    """Conv2d with TF "same" padding computed from the input's shape at each call, as most ports of TF models
    (and timm's `Conv2dSame`) write it: the traced graph has Shape->Gather->...->Pad arithmetic before the conv."""

    def forward(self, x):
        pads = []
        for size, kernel, stride, dilation in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation):
            total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
            pads = [total // 2, total - total // 2] + pads  # F.pad lists the last dim first
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def runtime_padding(model: nn.Module) -> nn.Module:
    """`model` with every conv of a kernel > 1 turned into a RuntimeSameConv with the same weights (the TF-port
    way of writing the same network: the outputs are the same numbers)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Conv2d) and max(module.kernel_size) > 1:
            conv = RuntimeSameConv(module.in_channels, module.out_channels, module.kernel_size, module.stride, 0,
                                   module.dilation, module.groups, module.bias is not None)
            conv.load_state_dict(module.state_dict())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, conv)
    return model.eval()


class TinyLite(nn.Module):
    """A few of EfficientNet-Lite0's MBConv blocks (ReLU6, TF "same" padding fixed for a 32x32 input)."""

    def __init__(self, image=32):
        super().__init__()
        self.stem, size = _same_conv(3, 8, 3, 2, image)
        self.bn, self.act = _bn(8), nn.ReLU6()
        self.blocks = nn.Sequential(MBConvBlock(8, 8, 3, 1, 2, size), MBConvBlock(8, 16, 5, 2, 3, size))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.blocks(self.act(self.bn(self.stem(x))))
        return self.fc(x.mean((2, 3)))


def lite0(size):
    return efficientnet_lite0() if size == "full" else _randomize_bn(TinyLite())


def image(resolution_full, resolution_tiny=32, channels=3, frames=None):
    """Example inputs: normal noise of the model's input shape."""
    def example(batch, size):
        side = resolution_full if size == "full" else resolution_tiny
        shape = (batch, channels) + ((frames if size == "full" else 4,) if frames else ()) + (side, side)
        return (torch.randn(shape),)
    return example


def waveform(batch, size):
    return (torch.randn(batch, 1, 16000 if size == "full" else 4000),)


def token_ids(batch, size):
    """Random ids of the vocabulary with a [CLS] first, as a tokenizer's output."""
    vocab, seq = (30522, 128) if size == "full" else (100, 16)
    ids = torch.randint(1000 if size == "full" else 5, vocab, (batch, seq))
    ids[:, 0] = 101 if size == "full" else 1
    return (ids,)


@dataclass(frozen=True)
class ZooModel:
    """`build(size)` gives the model in eval mode, `example(batch, size)` a tuple of its inputs; `real_images`:
    the model has trained weights and is fed ImageNet images (Lite0's preprocessing)."""

    build: Callable[[str], nn.Module]
    example: Callable[[int, str], tuple]
    real_images: bool = False


def _seeded(builder):
    def build(size):
        torch.manual_seed(0)
        return _randomize_bn(builder(size))
    return build


ZOO: dict[str, ZooModel] = {
    "mobilenet_v2": ZooModel(_seeded(mobilenet_v2), image(224)),
    "mobilenet_v3": ZooModel(_seeded(mobilenet_v3), image(224)),
    "resnet18": ZooModel(_seeded(resnet18), image(224)),
    "resnet50": ZooModel(_seeded(resnet50), image(224)),
    "convnext": ZooModel(_seeded(convnext), image(224)),
    "unet": ZooModel(_seeded(lambda s: UNet(32, 4) if s == "full" else UNet(4, 3)), image(224)),
    "vit": ZooModel(_seeded(lambda s: ViT(224, 16, 192, 12, 3) if s == "full" else ViT(32, 8, 16, 2, 2, 10)),
                    image(224)),
    "bert": ZooModel(_seeded(lambda s: BertEncoder(30522, 128, 256, 4, 4) if s == "full"
                             else BertEncoder(100, 16, 16, 2, 2)), token_ids),
    "audio_1d": ZooModel(_seeded(audio_net), waveform),
    "video_3d": ZooModel(_seeded(video_net), image(112, 16, frames=8)),
    "lite0_static": ZooModel(lite0, image(224), real_images=True),
    "lite0_runtime_pad": ZooModel(lambda size: runtime_padding(lite0(size)), image(224), real_images=True),
}
