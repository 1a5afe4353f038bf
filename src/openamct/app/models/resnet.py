"""ResNet-101 (and ResNet-50) with torchvision's architecture and state-dict keys, without depending on torchvision.

Each ReLU is its own module (torchvision reuses one per block) so every activation can be observed
separately; the pooled features are reshaped to (N, C) before ``fc`` as in AMCT's sample, with a
constant shape so the exported graph has no shape arithmetic.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

WEIGHTS_URL = "https://download.pytorch.org/models/resnet101-5d3b4d8f.pth"


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride, as torchvision), 1x1 expand by 4, plus the shortcut."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu3 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu3(out + identity)


def _layer(cin: int, width: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [Bottleneck(cin, width, stride)]
    layers += [Bottleneck(width * Bottleneck.expansion, width) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ResNet101(nn.Module):
    """ResNet-101 (v1.5) with random weights."""

    blocks = (3, 4, 23, 3)

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        self.layer1 = _layer(64, 64, self.blocks[0], 1)
        self.layer2 = _layer(256, 128, self.blocks[1], 2)
        self.layer3 = _layer(512, 256, self.blocks[2], 2)
        self.layer4 = _layer(1024, 512, self.blocks[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.avgpool(x).reshape(-1, self.fc.in_features)
        return self.fc(x)


class ResNet50(ResNet101):
    """ResNet-50 (v1.5) with random weights: the same bottleneck blocks, [3, 4, 6, 3] of them."""

    blocks = (3, 4, 6, 3)


def default_weights_path() -> Path:
    """Where torchvision would cache the checkpoint (honours TORCH_HOME)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(WEIGHTS_URL).name


def resnet101(weights: str | None = None, num_classes: int = 1000) -> ResNet101:
    """ResNet-101 in eval mode with the torchvision checkpoint at ``weights`` (default: torch hub cache)."""
    path = Path(weights) if weights is not None else default_weights_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"ResNet-101 weights not found at {path}: download {WEIGHTS_URL} "
            f"and put it at {default_weights_path()} or pass its path as weights"
        )
    model = ResNet101(num_classes)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()
