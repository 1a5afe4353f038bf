"""Tiny models that carry their own example inputs, covering every supported layer kind."""
import torch
from torch import nn


def _randomize_bn(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
    return model.eval()


class ConvNet(nn.Module):
    """conv-BN-ReLU6, depthwise conv-BN-ReLU, pointwise conv with a residual add, linear head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = nn.ReLU6()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 8, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.act1(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.dw(x)))
        x = self.pw(y) + x
        return self.fc(torch.flatten(self.pool(x), 1))

    @staticmethod
    def example_input(batch=1):
        return torch.randn(batch, 3, 16, 16)


class ExoticNet(nn.Module):
    """Conv1d, Conv3d and ConvTranspose2d paths summed into a linear layer."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm1d(6)
        self.c3 = nn.Conv3d(2, 3, 3, padding=1)
        self.up = nn.ConvTranspose2d(3, 5, 2, stride=2)
        self.fc = nn.Linear(6 + 3 + 5, 4)

    def forward(self, x):
        a = torch.relu(self.bn1(self.c1(x.reshape(x.shape[0], 4, -1)))).mean(2)
        b = self.c3(x.reshape(x.shape[0], 2, 4, 4, 4)).mean((2, 3, 4))
        c = self.up(x[:, :48].reshape(x.shape[0], 3, 4, 4)).mean((2, 3))
        return self.fc(torch.cat([a, b, c], 1))

    @staticmethod
    def example_input(batch=1):
        return torch.randn(batch, 128)


class Residual(nn.Module):
    """conv-BN-ReLU, conv-BN, plus the input, ReLU: a block that only looks at nearby pixels."""

    def __init__(self, channels):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + x)


class SqueezeExcite(nn.Module):
    """A 1x1 conv scaled per channel by two linear layers on the global mean: a block that sees the whole map."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)
        self.squeeze, self.excite = nn.Linear(channels, 4), nn.Linear(4, channels)

    def forward(self, x):
        gate = torch.sigmoid(self.excite(torch.relu(self.squeeze(x.mean((2, 3))))))
        return torch.relu(self.conv(x)) * gate[:, :, None, None]


class BlockNet(nn.Module):
    """A stem, two residual blocks and a squeeze-excite block in a Sequential, a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.Sequential(Residual(16), Residual(16), SqueezeExcite(16))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))

    @staticmethod
    def example_input(batch=1):
        return torch.randn(batch, 3, 32, 32)


def blocknet() -> BlockNet:
    torch.manual_seed(0)
    return _randomize_bn(BlockNet())


def convnet() -> ConvNet:
    torch.manual_seed(0)
    return _randomize_bn(ConvNet())


def exoticnet() -> ExoticNet:
    torch.manual_seed(0)
    return _randomize_bn(ExoticNet())


class FragileNet(nn.Module):
    """Four linear layers; fc3's input has one channel 300x larger than the others (fc2's channel 0 scaled up, fc3's
    weights for it scaled down: the float function is unchanged), so its per-tensor INT8 input quantization leaves
    the other channels a few levels: fc3 is the layer to keep float."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.fc4 = (nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 32),
                                                  nn.Linear(32, 10))
        with torch.no_grad():
            self.fc2.weight[0] *= 300
            self.fc2.bias[0] = self.fc2.bias[0].abs() * 300
            self.fc3.weight[:, 0] /= 300

    def forward(self, x):
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc4(torch.relu(self.fc3(x)))

    @staticmethod
    def example_input(batch=1):
        return torch.randn(batch, 16)


def fragilenet() -> FragileNet:
    torch.manual_seed(0)
    return FragileNet().eval()
