"""ResNet-101 for the sample: openamct's copy of torchvision's ResNet-101 (same module names and state-dict keys;
the classifier input is reshaped to (N, C), as in AMCT's sample), loading ./model/resnet101-5d3b4d8f.pth.

As in AMCT's sample, paths are relative to the working directory, which must be the sample root.
"""
import os

from openamct.app.models.resnet import WEIGHTS_URL, ResNet101
from openamct.app.models.resnet import resnet101 as _resnet101

MODEL_DIR = 'model'
MODEL_FILE = os.path.join(MODEL_DIR, os.path.basename(WEIGHTS_URL))  # model/resnet101-5d3b4d8f.pth

__all__ = ['MODEL_FILE', 'WEIGHTS_URL', 'ResNet101', 'resnet101']


def resnet101(pretrained=False, progress=True, **kwargs):
    """ResNet-101; with `pretrained`, the ImageNet weights from ./model/resnet101-5d3b4d8f.pth (in eval mode).

    `progress` is accepted for torchvision/AMCT compatibility; nothing is downloaded. Raises FileNotFoundError,
    saying what to download and where to put it, when the checkpoint is missing.
    """
    if not pretrained:
        return ResNet101(**kwargs)
    if not os.path.isfile(MODEL_FILE):
        raise FileNotFoundError(
            f"model file {os.path.realpath(MODEL_FILE)} not found: download {WEIGHTS_URL} into "
            f"{os.path.realpath(MODEL_DIR)}/ (e.g. 'wget -P {MODEL_DIR} {WEIGHTS_URL}' from the sample root)")
    return _resnet101(MODEL_FILE, **kwargs)
