"""Predictors and evaluation shared by the CLI and the benchmarks: a PyTorch model or an ONNX Runtime session as
a function from an image batch to (N, classes) logits, run over a dataset or an array of images."""
from __future__ import annotations

import time

import numpy as np
import onnx
import onnxruntime as ort
import torch
from tqdm import tqdm

from ..onnx_export.parity import session
from .data import Accuracy, ImageLoader


class EvaluationError(ValueError):
    """A model whose output is not (N, classes) logits of the images it was given."""


class TorchPredictor:
    """A PyTorch model in eval mode, without gradients, on `device` (default: where its parameters are)."""

    def __init__(self, model: torch.nn.Module, device=None):
        parameter = next(model.parameters(), None)
        self.model = model
        self.device = device or (parameter.device if parameter is not None else torch.device("cpu"))

    def __call__(self, images) -> np.ndarray:
        images = torch.as_tensor(images)
        with torch.no_grad():
            return self.model(images.to(self.device)).float().cpu().numpy()


class OnnxPredictor:
    """An ONNX model (a path, a ModelProto or an InferenceSession) in ONNX Runtime on the CPU. A model exported
    with a fixed batch size gets its batches cut and the last one padded to it."""

    def __init__(self, model, threads: int = 0):
        self.session = model if isinstance(model, ort.InferenceSession) else session(
            model if isinstance(model, onnx.ModelProto) else str(model), threads=threads)
        first = self.session.get_inputs()[0]
        self.input = first.name
        batch = first.shape[0] if first.shape else None
        self.fixed_batch = batch if isinstance(batch, int) and batch > 0 else None

    def __call__(self, images) -> np.ndarray:
        array = np.ascontiguousarray(torch.as_tensor(images).numpy(), dtype=np.float32)
        step = self.fixed_batch or len(array)
        outputs = []
        for start in range(0, len(array), step):
            part = array[start:start + step]
            if len(part) < step:
                part = np.concatenate([part, np.zeros((step - len(part),) + part.shape[1:], np.float32)])
            outputs.append(self.session.run(None, {self.input: part})[0][:len(array) - start])
        return np.concatenate(outputs)


def logits(predictor, images, batch: int = 32) -> np.ndarray:
    """The predictor's logits for all `images` (an array or tensor), `batch` at a time."""
    return np.concatenate([predictor(images[i:i + batch]) for i in range(0, len(images), batch)])


def evaluate(predictors: dict, dataset, batch_size: int, workers: int, desc: str):
    """Run every predictor on every batch of `dataset` (images decoded once). Returns (accuracies, seconds, top-1
    predictions, skipped image paths)."""
    accuracy = {name: Accuracy() for name in predictors}
    seconds = {name: 0.0 for name in predictors}
    predictions = {name: [] for name in predictors}
    loader = ImageLoader(dataset, batch_size, workers)
    with tqdm(total=len(dataset), desc=desc, unit="img", dynamic_ncols=True) as bar:
        for images, labels in loader:
            for name, predict in predictors.items():
                start = time.perf_counter()
                out = np.asarray(predict(images))
                seconds[name] += time.perf_counter() - start
                if out.ndim != 2 or out.shape[0] != len(labels):
                    raise EvaluationError(f"{name}: expected (N, classes) logits, got shape {out.shape}")
                accuracy[name].update(out, labels)
                predictions[name].append(out.argmax(1))
            bar.update(len(labels))
            bar.set_postfix({name: f"{100 * acc.top1:.1f}%" for name, acc in accuracy.items()}, refresh=False)
        bar.update(len(dataset) - bar.n)  # skipped images
    top1 = {name: np.concatenate(p) if p else np.zeros(0, np.int64) for name, p in predictions.items()}
    return accuracy, seconds, top1, list(loader.skipped)
