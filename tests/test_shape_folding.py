"""The fused model's shape folding (issue 20 item 1) computes the same numbers as PyTorch: a folding that gets a
pad amount wrong (onnxslim did, on torch's F.pad export) shifts the image and is caught here exactly, at batch
sizes other than the exported one, with the batch-dependent arithmetic kept."""
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F

from openamct.onnx_export.fused import fused_model

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from zoo_models import RuntimeSameConv


class TinyRuntimePad(torch.nn.Module):
    """TF-'same' convs of odd strides and kernels on a non-square input (asymmetric pads), a reshape by x.shape[0]
    (kept: the batch is dynamic) and a 1-D F.pad whose amount comes from the reshaped tensor's last dim."""

    def __init__(self):
        super().__init__()
        self.convs = torch.nn.Sequential(RuntimeSameConv(3, 4, 3, 2), RuntimeSameConv(4, 4, 5, 1, groups=4),
                                         RuntimeSameConv(4, 6, (3, 2), (2, 3)))
        self.fc = torch.nn.Linear(6, 5)

    def forward(self, x):
        x = self.convs(x)
        x = x.reshape(x.shape[0], x.shape[1], -1)
        x = F.pad(x, [x.shape[-1] % 4, 1], value=0.5)
        return self.fc(x.mean(-1))


def test_folded_fused_model_equals_pytorch_at_any_batch():
    torch.manual_seed(0)
    model = TinyRuntimePad().eval()
    dynamic = {"input": {0: "batch"}, "output": {0: "batch"}}
    onnx_model, _ = fused_model(model, torch.randn(2, 3, 15, 22), ["input"], ["output"], dynamic)
    ops = [n.op_type for n in onnx_model.graph.node]
    assert not {"Sub", "Div", "Mod", "Slice", "ConstantOfShape"} & set(ops), ops
    assert ops.count("Conv") == 3 and ops.count("Shape") <= 1, ops  # x.shape[0] of the reshape only
    # the conv pads are in the convs; the 0.5 pad stays a Pad, of constant amounts
    constants = {i.name for i in onnx_model.graph.initializer}
    assert [n.input[1] in constants for n in onnx_model.graph.node if n.op_type == "Pad"] == [True]
    sess = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = torch.randn(batch, 3, 15, 22)
        with torch.no_grad():
            want = model(x).numpy()
        np.testing.assert_allclose(sess.run(None, {"input": x.numpy()})[0], want, rtol=1e-5, atol=1e-6)
