"""QAT (retrain): config files, ULQ gradients against AMCT's formula, the AMCT call flow with export parity,
save/restore, and a 2-process gloo DDP run."""
import json
import os
import sys

import numpy as np
import onnx
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from onnx import numpy_helper
from tiny_models import ConvNet, convnet

import openamct as amct
from openamct.amct.config_files import load_retrain_json, save_retrain_json
from openamct.amct.record import read_record
from openamct.app import training
from openamct.core import qat
from openamct.core.algorithms import IFMRObserver
from openamct.core.config import ActQuantParams, ConfigError, RetrainDataParams
from openamct.core.primitives import act_qparams
from openamct.core.quantizers import ULQActQuantizer

SAMPLE_CFG = """batch_num: 2
override_layer_types {
  layer_type: "Conv2d"
  retrain_weight_quant_config { arq_retrain { channel_wise: true } }
}
override_layer_types {
  layer_type: "Linear"
  retrain_weight_quant_config { arq_retrain { channel_wise: false } }
}
"""


def batches(n, batch=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 16, 16, generator=gen), torch.randint(0, 10, (batch,), generator=gen))
            for _ in range(n)]


def qat_flow(tmp_path, cfg_text=None, steps=4, model=None):
    """create config -> QAT model -> a few distillation steps; returns (qmodel, float model, paths)."""
    os.chdir(tmp_path)
    model = model or convnet()
    example = ConvNet.example_input(2)
    cfg = None
    if cfg_text is not None:
        cfg = tmp_path / "retrain.cfg"
        cfg.write_text(cfg_text)
    amct.create_quant_retrain_config("tmp/config.json", model, example, cfg)
    qmodel = amct.create_quant_retrain_model("tmp/config.json", model, "tmp/record.txt", example)
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(qat.parameter_groups(qmodel, 0.0), lr=1e-3)
    training.train(qmodel, batches(steps), steps, optimizer, teacher=model, kd_weight=0.5)
    return qmodel, model, example


def test_retrain_cfg_overrides_and_json_round_trip(tmp_path):
    model = convnet()
    (tmp_path / "retrain.cfg").write_text(SAMPLE_CFG + 'skip_layers: "dw"\n'
                                          'override_layer_configs { layer_name: "pw" retrain_weight_quant_config '
                                          '{ ulq_retrain { dst_type: INT4 } } retrain_data_quant_config '
                                          '{ ulq_quantize { clip_max_min { clip_max: 3.0 clip_min: -1.0 } } } }\n')
    amct.create_quant_retrain_config(str(tmp_path / "config.json"), model, ConvNet.example_input(),
                                     str(tmp_path / "retrain.cfg"))
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["batch_num"] == 2
    assert data["conv1"]["retrain_weight_config"] == {"algo": "arq_retrain", "channel_wise": True, "dst_type": "INT8"}
    assert data["fc"]["retrain_weight_config"]["channel_wise"] is False
    assert data["dw"]["retrain_enable"] is False
    assert data["pw"]["retrain_weight_config"] == {"algo": "ulq_retrain", "channel_wise": True, "dst_type": "INT4"}
    assert data["pw"]["retrain_data_config"] == {"algo": "ulq_quantize", "dst_type": "INT8", "clip_max": 3.0,
                                                 "clip_min": -1.0}
    config = load_retrain_json(str(tmp_path / "config.json"))
    save_retrain_json(config, str(tmp_path / "again.json"))  # the file round-trips through the core's config
    assert json.loads((tmp_path / "again.json").read_text()) == data


@pytest.mark.parametrize("text, message", [
    ("retrain_weight_quant_config { arq_retrain { dst_type: INT16 } }\n", "retrain.cfg:1: field "
                                                                           "'retrain_weight_config.dst_type'"),
    ('batch_num: 1\nskip_layers: "pww"\n', "retrain.cfg:2: skip_layers entry 'pww' is not a quantizable layer of the "
                                           "model; did you mean 'pw'?"),
    ("batch_num: 1\nretrain_data_quant_config { ulq_quantize { clip_max_min { clip_max: -1 clip_min: -2 } } }\n",
     "retrain.cfg:2: field 'retrain_data_config.clip_max'"),
    ("batch_num: 1\nprune_config {}\n", "retrain.cfg:2:1"),
])
def test_bad_retrain_cfg_names_the_line(tmp_path, text, message):
    (tmp_path / "retrain.cfg").write_text(text)
    with pytest.raises(ConfigError) as error:
        amct.create_quant_retrain_config(str(tmp_path / "c.json"), convnet(), ConvNet.example_input(),
                                         str(tmp_path / "retrain.cfg"))
    assert message in str(error.value)
    assert not (tmp_path / "c.json").exists()


def test_ulq_gradients_follow_amct_formula():
    """d/d clip_max = sum g * (e + 1[x above]), d/d clip_min = sum g * (1[x below] - e),
    e = (round(x/s) - x/s) / (2^b - 1) (spec 4.6), computed here in numpy."""
    quantizer = ULQActQuantizer(ActQuantParams(), 1, None, "t",
                                        RetrainDataParams(clip_max=2.0, clip_min=-1.0)).train()
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(4000, generator=gen) * 4.4 - 1.7).requires_grad_()
    g = torch.randn(4000, generator=gen)
    (quantizer(x) * g).sum().backward()
    xs, gs = x.detach().double().numpy(), g.double().numpy()
    scale = 3.0 / 255
    offset = np.round(-128 + 1.0 / scale)
    codes = np.round(xs / scale) + offset
    above, below = codes > 127, codes < -128
    inside = ~(above | below)
    e = (np.round(xs / scale) - xs / scale) / 255
    assert quantizer.clip_max.grad.item() == pytest.approx(np.sum(gs * (e * inside + above)), rel=1e-3)
    assert quantizer.clip_min.grad.item() == pytest.approx(np.sum(gs * (below - e * inside)), rel=1e-3, abs=1e-3)
    np.testing.assert_allclose(x.grad.numpy(), np.where(inside, gs, 0.0), atol=1e-6)


def test_ulq_starts_from_ifmr_of_the_first_batches():
    params = ActQuantParams()
    quantizer = ULQActQuantizer(params, 2, None, "t", RetrainDataParams()).train()
    reference = IFMRObserver(params, True, 2, "t")
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        x = torch.randn(3000, generator=gen) * 2 + 0.5
        reference.observe(x)
        quantizer(x)
    clip_min, clip_max = reference.compute((-float("inf"), float("inf")))
    assert bool(quantizer.initialized)
    assert quantizer.clip_min.item() == pytest.approx(clip_min, rel=1e-6)
    assert quantizer.clip_max.item() == pytest.approx(clip_max, rel=1e-6)


def test_qat_flow_trains_clips_and_exports_with_parity(tmp_path):
    qmodel, model, example = qat_flow(tmp_path, SAMPLE_CFG.replace("batch_num: 2", "batch_num: 1"))
    clips = {name: p for name, p in qmodel.named_parameters() if name.endswith("clip_max")}
    assert clips and all(p.grad is not None and p.grad.abs().sum() > 0 for p in clips.values())
    assert (tmp_path / "tmp/record.txt").read_text() == ""  # written by the first eval batch after training
    qmodel.eval()
    with torch.no_grad():
        qmodel(example)
    assert 'key: "fc"' in (tmp_path / "tmp/record.txt").read_text()
    report = amct.save_quant_retrain_model("tmp/config.json", qmodel, "tmp/record.txt", "out/tiny", example,
                                           input_names=["input"], output_names=["output"])
    assert all(result["ok"] for result in report["parity"].values()), report["parity"]
    assert report["parity"]["fake_quant"]["max_abs_diff"] < 1e-4
    assert os.path.exists("out/tiny_deploy_model.onnx") and os.path.exists("out/tiny_fake_quant_model.onnx")


def test_int4_weights_export_on_the_learned_grid(tmp_path):
    qmodel, _, example = qat_flow(tmp_path, "retrain_weight_quant_config { ulq_retrain { dst_type: INT4 } }\n")
    learned = {name: m.weight_quantizer.log_scale.detach().exp() for name, m in qmodel.named_modules()
               if isinstance(m, qat.RetrainLayer)}
    report = amct.save_quant_retrain_model("tmp/config.json", qmodel, "tmp/record.txt", "out/w4", example)
    assert all(result["ok"] for result in report["parity"].values()), report["parity"]
    records = read_record("tmp/record.txt")
    for name, scale in learned.items():
        np.testing.assert_allclose(records[name].scale_w, scale.numpy(), rtol=1e-6)
    deploy = onnx.load("out/w4_deploy_model.onnx")
    int8_weights = [numpy_helper.to_array(i) for i in deploy.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert int8_weights and all(w.min() >= -8 and w.max() <= 7 for w in int8_weights)


def test_restore_reproduces_the_model_exactly(tmp_path):
    qmodel, model, example = qat_flow(tmp_path)
    torch.save({"state_dict": qmodel.state_dict()}, "tmp/model_best.pth.tar")
    restored = amct.restore_quant_retrain_model("tmp/config.json", model, "tmp/record2.txt", example,
                                                "tmp/model_best.pth.tar", "state_dict")
    x = ConvNet.example_input(4)
    for mode in (True, False):
        qmodel.train(mode)
        restored.train(mode)
        with torch.no_grad():
            assert torch.equal(qmodel(x), restored(x))
    with pytest.raises(KeyError, match="no 'weights'"):
        amct.restore_quant_retrain_model("tmp/config.json", model, "tmp/r.txt", example, "tmp/model_best.pth.tar",
                                         "weights")


def test_refuses_data_parallel_and_untrained_save(tmp_path):
    os.chdir(tmp_path)
    model, example = convnet(), ConvNet.example_input()
    amct.create_quant_retrain_config("c.json", model, example)
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        amct.create_quant_retrain_model("c.json", torch.nn.DataParallel(model), "r.txt", example)
    qmodel = amct.create_quant_retrain_model("c.json", model, "r.txt", example)
    with pytest.raises(RuntimeError, match="not been trained"):
        amct.save_quant_retrain_model("c.json", qmodel, "r.txt", "out/m", example)


def _ddp_worker(rank, world, out_dir, report_dir, port):
    """One rank: trains on its own data; records which files it opened for writing under `out_dir`."""
    written = []
    sys.addaudithook(lambda event, args: written.append(str(args[0])) if event == "open" and isinstance(
        args[0], str) and args[0].startswith(out_dir) and args[1] is not None and set(str(args[1])) & set("wax+")
        else None)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    os.chdir(out_dir)
    model, example = convnet(), ConvNet.example_input(2)
    amct.create_quant_retrain_config("tmp/config.json", model, example)
    dist.barrier()
    qmodel = amct.create_quant_retrain_model("tmp/config.json", model, "tmp/record.txt", example)
    ddp = torch.nn.parallel.DistributedDataParallel(qmodel)
    optimizer = torch.optim.SGD(qat.parameter_groups(qmodel, 0.0), lr=0.05, momentum=0.9)
    training.train(ddp, batches(4, seed=10 + rank), 4, optimizer, teacher=model, kd_weight=0.5)
    qmodel.eval()
    with torch.no_grad():
        qmodel(example)
    amct.save_quant_retrain_model("tmp/config.json", ddp, "tmp/record.txt", "out/ddp", example)
    dist.barrier()
    state = {name: value.tolist() for name, value in qmodel.state_dict().items()}
    with open(os.path.join(report_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"state": state, "written": written}, f)
    dist.destroy_process_group()


def test_ddp_two_processes_gloo(tmp_path):
    out_dir, report_dir = tmp_path / "run", tmp_path / "reports"
    out_dir.mkdir()
    report_dir.mkdir()
    mp.spawn(_ddp_worker, args=(2, str(out_dir), str(report_dir), 29400 + os.getpid() % 500), nprocs=2)
    ranks = [json.loads((report_dir / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["state"] == ranks[1]["state"]  # identical weights and quantizers, data differed
    clip = ranks[0]["state"]["pw.input_quantizer.clip_max"]
    assert clip != 1.0  # initialised (from the ranks' mean IFMR) and trained
    assert ranks[1]["written"] == []
    assert any(p.endswith("ddp_deploy_model.onnx") for p in ranks[0]["written"])
    assert (out_dir / "out/ddp_fake_quant_model.onnx").exists() and (out_dir / "tmp/record.txt").read_text()


def test_start_from_a_calibrated_model(tmp_path):
    """QAT initialised from PTQ: before any training step its eval output is the PTQ simulation's."""
    model, x = convnet(), ConvNet.example_input(8)
    calibrated = amct.quantize(model, amct.default_config(model, x), lambda m: m(x), x)
    os.chdir(tmp_path)
    amct.create_quant_retrain_config("c.json", model, x)
    qmodel = qat.start_from(amct.create_quant_retrain_model("c.json", model, "r.txt", x), calibrated)
    assert qat.initialised(qmodel)
    qmodel.eval()
    with torch.no_grad():
        torch.testing.assert_close(qmodel(x), calibrated(x), atol=1e-5, rtol=1e-5)
    again = qat.start_from_ptq(amct.create_quant_retrain_model("c.json", model, "r.txt", x), model,
                                   load_retrain_json("c.json"), lambda m: m(x), x).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), calibrated(x), atol=1e-5, rtol=1e-5)


def test_learned_range_stays_within_what_the_producer_outputs(tmp_path):
    """A ReLU6-fed range learned a rounding error above 6 quantizes as 0..6: codes above 6 are never used, and the
    deployed Q then implies the Clip before it (ORT 1.30 fails to load such a QDQ model where it does not)."""
    qmodel, _, example = qat_flow(tmp_path)
    quantizer = qmodel.dw.input_quantizer
    assert quantizer.bounds == (0.0, 6.0)
    with torch.no_grad():
        quantizer.clip_max.fill_(6.0 + 1e-5)
    qmodel.eval()
    with torch.no_grad():
        qmodel(example)
    assert (float(quantizer.scale), int(quantizer.offset)) == act_qparams(0.0, 6.0, 8, True)
    report = amct.save_quant_retrain_model("tmp/config.json", qmodel, "tmp/record.txt", "out/tiny", example)
    assert all(result["ok"] for result in report["parity"].values()), report["parity"]
    assert read_record("tmp/record.txt")["dw"].scale_d == pytest.approx(6.0 / 255, rel=1e-7)


def test_mixup_trains_on_blends_of_each_batch_with_its_reverse():
    """Student and teacher see the same blend lam * x + (1 - lam) * x[::-1]; the label loss is blended alike."""
    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            seen.append(x.detach().clone())
            return self.fc(x)

    student, teacher = Recorder(), Recorder()
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    torch.manual_seed(0)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.0)
    (loss,) = training.train(student, [(x, y)], 1, optimizer, teacher=teacher, kd_weight=0.5, mixup=0.4)
    blended, teacher_input = seen
    assert torch.equal(blended, teacher_input)
    lam = float(((blended - x.flip(0)) * (x - x.flip(0))).sum() / (x - x.flip(0)).pow(2).sum())
    assert 0 < lam < 1 and lam != pytest.approx(0.5, abs=1e-3)
    torch.testing.assert_close(blended, lam * x + (1 - lam) * x.flip(0))
    with torch.no_grad():
        logits, soft = student.fc(blended), teacher.fc(blended)
    expected = (lam * training.distillation_loss(logits, soft, y, 0.5)
                + (1 - lam) * training.distillation_loss(logits, soft, y.flip(0), 0.5))
    assert loss == pytest.approx(float(expected), rel=1e-5)
    seen.clear()
    training.train(student, [(x, y)], 1, optimizer)  # mixup off: the batch as it is
    assert torch.equal(seen[0], x)
    with pytest.raises(ValueError, match="mixup: expected alpha >= 0"):
        training.train(student, [(x, y)], 1, optimizer, mixup=-0.5)
