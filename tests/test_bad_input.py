"""Bad input fails early with a message that names the layer, file or step at fault; outputs are never half-written."""
import os
import pickle

import pytest
import torch
from tiny_models import ConvNet, convnet

import openamct as amct
from openamct.app.models.resnet import resnet101
from openamct.core.fileio import atomic_path, write_text


@pytest.fixture
def calibration_model(tmp_path):
    os.chdir(tmp_path)
    amct.create_quant_config("config.json", convnet(), ConvNet.example_input(), batch_num=2)
    return amct.quantize_model("config.json", "modified.onnx", "record.txt", convnet(), ConvNet.example_input())


def test_save_model_before_calibration_finished(calibration_model, tmp_path):
    with pytest.raises(RuntimeError, match="calibration has not finished"):
        amct.save_model("modified.onnx", "record.txt", "out/model")
    with torch.no_grad():
        calibration_model(ConvNet.example_input(4))  # 1 of 2 batches
    with pytest.raises(RuntimeError, match="calibration has not finished"):
        amct.save_model("modified.onnx", "record.txt", "out/model")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("batch,message", [(torch.empty(0, 3, 16, 16), "empty calibration batch"),
                                           (torch.full((2, 3, 16, 16), float("nan")),
                                            "calibration input holds NaN or Inf")])
def test_bad_calibration_batch_names_the_layer(calibration_model, batch, message):
    with pytest.raises(ValueError, match=f"layer 'conv1': {message}"), torch.no_grad():
        calibration_model(batch)


def test_save_model_rejects_a_foreign_onnx(tmp_path):
    os.chdir(tmp_path)
    torch.onnx.export(convnet(), (ConvNet.example_input(),), "plain.onnx", dynamo=False)
    write_text("record.txt", 'record { key: "conv1" value { scale_d: 1 offset_d: 0 } }\n')
    with pytest.raises(ValueError, match="plain.onnx: not a model written by openamct"):
        amct.save_model("plain.onnx", "record.txt", "out/model")


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "record.txt"
    target.write_text("old content")
    with pytest.raises(RuntimeError), atomic_path(str(target)) as tmp, open(tmp, "w") as f:
        f.write("half of the new")
        raise RuntimeError("crash while writing")
    assert target.read_text() == "old content"
    assert os.listdir(tmp_path) == ["record.txt"]  # no temporary file left behind


def test_checkpoints_load_with_weights_only(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    path = tmp_path / "resnet101-5d3b4d8f.pth"
    with open(path, "wb") as f:
        pickle.dump({"conv1.weight": Payload()}, f)
    with pytest.raises(pickle.UnpicklingError):
        resnet101(str(path))
