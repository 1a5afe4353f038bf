"""Memory under load: calibration's peak RSS against the number of batches, and `openamct evaluate` against the
number of images.

Run by hand (not in CI), e.g. ``python benchmarks/memory.py --out /tmp/membench``.
- Calibration: EfficientNet-Lite0 through the AMCT calls (create_quant_config .. save_model), default W8A8, with
  8, 32 and 128 batches of 32 images: the first 256 sample images, held in memory in every run (so the data adds
  the same to every peak) and cycled. Each run is a spawned child; the peak is its VmHWM after calibration and
  after save_model.
  Calibration keeps fixed-size statistics (IFMR's bounded sample, HFMG's histogram, GPTQ's Hessians), so the
  peak must not grow with the batches.
- Evaluation: `openamct evaluate --model efficientnet_lite0` on folders of 1 000 and 10 000 small generated
  JPEGs (a child each, peak RSS from its VmHWM): images are decoded batch by batch, so the peak must not grow
  with the folder.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ortbaseline import proc_mem_mb  # noqa: E402

MODEL = "efficientnet_lite0"


def calibrate_child(images_path: str, batch_num: int, work: str, queue) -> None:
    import torch

    import openamct as amct
    from openamct.app.models import MODELS
    torch.set_num_threads(2)
    os.environ.setdefault("AMCT_LOG_LEVEL", "warning")
    os.chdir(work)
    images = np.array(np.load(images_path, mmap_mode="r")[:256])
    model = MODELS[MODEL].build(None)
    x0 = torch.from_numpy(np.array(images[:1]))
    base = proc_mem_mb()
    start = time.perf_counter()
    amct.create_quant_config("config.json", model, x0, batch_num=batch_num)
    qmodel = amct.quantize_model("config.json", "modified_model.onnx", "record.txt", model, x0)
    with torch.no_grad():
        for b in range(batch_num):
            index = [(32 * b + i) % len(images) for i in range(32)]
            qmodel(torch.from_numpy(np.array(images[index])))
    calibrated = proc_mem_mb()
    seconds = time.perf_counter() - start
    amct.save_model("modified_model.onnx", "record.txt", "lite0")
    queue.put({"batch_num": batch_num, "base_rss_mb": base, "peak_rss_mb_calibration": calibrated,
               "peak_rss_mb_with_save": proc_mem_mb(), "calibration_s": seconds})


def evaluate_peak(folder: Path, labels: Path) -> dict:
    """Peak RSS (MB) of `openamct evaluate` on `folder`, from the child's VmHWM read just before it exits."""
    code = ("import sys, atexit\nfrom openamct.app.cli import main\n"
            "def peak():\n"
            "    print('PEAK', [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])\n"
            "atexit.register(peak)\nsys.exit(main(sys.argv[1:]))\n")
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", code, "evaluate", "--model", MODEL, "--images", str(folder),
                          "--labels", str(labels), "--threads", "2"], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    peak = next(int(line.split()[1]) / 1024 for line in run.stdout.splitlines() if line.startswith("PEAK"))
    return {"images": sum(1 for _ in folder.iterdir()), "peak_rss_mb": peak, "seconds": time.perf_counter() - start,
            "returncode": run.returncode}


def make_folder(folder: Path, count: int, sources: list[Path]) -> None:
    """`count` small JPEGs named <wnid>_<i>.JPEG (re-encoded sample images at 80 x 80, cycled)."""
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    small = []
    for path in sources[:50]:
        with Image.open(path) as image:
            small.append((path.name.split("_", 1)[0], image.convert("RGB").resize((80, 80))))
    for i in range(count):
        wnid, image = small[i % len(small)]
        image.save(folder / f"{wnid}_{i:05d}.JPEG", quality=85)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "imagenet-sample")
    p.add_argument("--batches", default="8,32,128")
    p.add_argument("--folders", default="1000,10000")
    p.add_argument("--out", type=Path, default=Path("/tmp/membench"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"calibration": [], "evaluation": []}
    from openamct.app.data import ImageLoader, LabelledImages
    from openamct.app.models import MODELS
    images_path = args.out / "images.npy"
    if not images_path.exists():
        dataset = LabelledImages(args.data / "images", MODELS[MODEL].preprocess, labels=args.data / "synsets.txt")
        np.save(images_path, np.concatenate([x.numpy() for x, _ in ImageLoader(dataset, 32, 2)]))
    for batch_num in (int(n) for n in args.batches.split(",") if n):
        work = args.out / f"calib_{batch_num}"
        work.mkdir(exist_ok=True)
        queue = mp.get_context("spawn").Queue()
        child = mp.get_context("spawn").Process(target=calibrate_child,
                                                args=(str(images_path), batch_num, str(work), queue))
        child.start()
        row = queue.get()
        child.join()
        results["calibration"].append(row)
        print(json.dumps(row), flush=True)
    sources = sorted((args.data / "images").iterdir())
    for count in (int(n) for n in args.folders.split(",") if n):
        folder = args.out / f"eval_{count}"
        if not folder.exists():
            make_folder(folder, count, sources)
        row = evaluate_peak(folder, args.data / "synsets.txt")
        results["evaluation"].append(row)
        print(json.dumps(row), flush=True)
    (args.out / "memory.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
