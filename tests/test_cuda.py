"""The CUDA paths, run where a GPU is (skipped elsewhere): calibration (IFMR, HFMG, GPTQ, NUQ) and QAT on the GPU
give the CPU's results, and the models exported from the GPU keep parity with ONNX Runtime."""
import os

import numpy as np
import pytest
import torch
from test_export import run_flow
from test_retrain import SAMPLE_CFG, batches
from tiny_models import ConvNet, convnet

import openamct as amct
from openamct.amct.record import read_record
from openamct.app import training
from openamct.core import qat

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def full_float32_convs(monkeypatch):
    """PyTorch runs float32 convs in TF32 on the GPU by default, which moves the float calibration passes by ~1e-3;
    the comparisons with the CPU below are of openamct's arithmetic, so they run in full float32."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)

CONFIGS = {"ifmr_gptq": None,  # the default: IFMR activations, GPTQ weights with bias correction (depthwise too)
           "hfmg": "batch_num: 2\ncommon_config { hfmg_quantize { num_of_bins: 1024 } }\n",
           "nuq": "batch_num: 2\nnuq_config { nuq_quantize { num_steps: 8 codebook: \"layer\" } }\n"}


def calibrated(tmp_path, device: str, cfg_text: str | None):
    """The AMCT PTQ flow with model and data on `device`; returns (sim outputs on fresh data, records, report)."""
    folder = tmp_path / device
    folder.mkdir()
    cfg = None
    if cfg_text:
        cfg = folder / "calib.cfg"
        cfg.write_text(cfg_text)
    torch.manual_seed(0)
    data = [ConvNet.example_input(8).to(device) for _ in range(2)]
    qmodel, report = run_flow(folder, convnet().to(device), ConvNet.example_input().to(device), data,
                              config_defination=str(cfg) if cfg else None)
    with torch.no_grad():
        out = qmodel(ConvNet.example_input(16).to(device)).cpu()
    return out, read_record("tmp/record.txt"), report


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_calibration_on_cuda_matches_cpu_and_exports_with_parity(tmp_path, name):
    out_cpu, records_cpu, _ = calibrated(tmp_path, "cpu", CONFIGS[name])
    out_gpu, records_gpu, report = calibrated(tmp_path, "cuda", CONFIGS[name])
    for kind, result in report["parity"].items():
        assert result["ok"], (kind, result)
    assert set(records_gpu) == set(records_cpu)
    for layer, cpu in records_cpu.items():
        gpu = records_gpu[layer]
        assert gpu.scale_d == pytest.approx(cpu.scale_d, rel=1e-3), layer
        assert abs(gpu.offset_d - cpu.offset_d) <= 1, layer
        np.testing.assert_allclose(gpu.scale_w, cpu.scale_w, rtol=1e-4, err_msg=layer)
        levels_cpu, levels_gpu = np.asarray(cpu.nuq_levels), np.asarray(gpu.nuq_levels)
        assert levels_gpu.shape == levels_cpu.shape, layer
        if levels_cpu.size:  # NUQ codebooks: the same levels, but for a rare near-tie
            assert np.mean(levels_gpu == levels_cpu) >= 0.9, layer
    step = float(records_cpu["fc"].scale_d)  # a few output codes may round the other way, no more
    assert float((out_gpu - out_cpu).abs().max()) < 0.1 * float(out_cpu.abs().max()) + step
    assert float((out_gpu.argmax(1) == out_cpu.argmax(1)).float().mean()) >= 0.9


def test_qat_on_cuda_trains_and_exports_with_parity(tmp_path):
    os.chdir(tmp_path)
    model, example = convnet().cuda(), ConvNet.example_input(2).cuda()
    (tmp_path / "retrain.cfg").write_text(SAMPLE_CFG.replace("batch_num: 2", "batch_num: 1") +
                                          "retrain_weight_quant_config { ulq_retrain { dst_type: INT4 } }\n")
    amct.create_quant_retrain_config("tmp/config.json", model, example, "retrain.cfg")
    qmodel = amct.create_quant_retrain_model("tmp/config.json", model, "tmp/record.txt", example)
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(qat.parameter_groups(qmodel, 0.0), lr=1e-3)
    losses = training.train(qmodel, batches(6), 6, optimizer, teacher=model, kd_weight=0.5, device="cuda")
    assert all(np.isfinite(losses))
    clips = [p for name, p in qmodel.named_parameters() if name.endswith("clip_max")]
    assert clips and all(p.is_cuda and p.grad is not None and p.grad.abs().sum() > 0 for p in clips)
    qmodel.eval()
    report = amct.save_quant_retrain_model("tmp/config.json", qmodel, "tmp/record.txt", "out/tiny", example,
                                           input_names=["input"], output_names=["output"])
    assert all(result["ok"] for result in report["parity"].values()), report["parity"]
    torch.save({"state_dict": qmodel.state_dict()}, "tmp/checkpoint.pth")
    restored = amct.restore_quant_retrain_model("tmp/config.json", model, "tmp/record2.txt", example,
                                                "tmp/checkpoint.pth", "state_dict")
    x = ConvNet.example_input(4).cuda()
    restored.eval()
    with torch.no_grad():
        assert torch.equal(qmodel(x), restored(x))
