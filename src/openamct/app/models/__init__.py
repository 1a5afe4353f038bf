"""Built-in models, each with the preprocessing it was trained with, and loading of user model files."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..data import Preprocess
from .efficientnet_lite import EfficientNetLite0, efficientnet_lite0
from .resnet import ResNet50, ResNet101, resnet101

__all__ = [
    "MODELS", "EfficientNetLite0", "ModelSpec", "ResNet50", "ResNet101", "efficientnet_lite0", "load_model_file",
    "resnet101",
]


@dataclass(frozen=True)
class ModelSpec:
    """How to build a model (``build(weights)`` returns it in eval mode) and feed it."""

    build: Callable[[str | None], nn.Module]
    preprocess: Preprocess
    input_shape: tuple[int, ...] = (1, 3, 224, 224)


MODELS: dict[str, ModelSpec] = {
    "efficientnet_lite0": ModelSpec(
        efficientnet_lite0, Preprocess(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic")
    ),
    "resnet101": ModelSpec(resnet101, Preprocess()),
}


def load_model_file(spec: str) -> nn.Module:
    """Build a user model from ``"path/to/file.py:factory"``: import the file, call ``factory()``.

    The model is returned in eval mode.
    """
    file_name, sep, factory_name = spec.rpartition(":")
    if not sep or not file_name or not factory_name:
        raise ValueError(f"expected 'path/to/file.py:factory', got {spec!r}")
    path = Path(file_name)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    name = f"_openamct_model_{path.stem}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # lets dataclasses and pickling inside the file find their module
    module_spec.loader.exec_module(module)
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise ValueError(f"{path} has no callable named {factory_name!r}")
    model = factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"{spec}: {factory_name}() returned {type(model).__name__}, not a torch.nn.Module")
    return model.eval()
