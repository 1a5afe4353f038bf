"""Shared test settings."""
import os
import tempfile
from pathlib import Path

import pytest

# The ImageNet sample lives beside the repository (shared/), never inside it.
SAMPLE_DIR = Path(__file__).parents[2] / "shared" / "data" / "imagenet-sample"

# Kernel timings (onnx_export/fallback.py) of this run, and of the processes tests start, go to a cache of their
# own, never the user's.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="openamct-test-cache-")
_REAL_TIMER = []


@pytest.fixture(autouse=True, scope="session")
def integer_kernels():
    """Which layers a deploy model keeps float follows ONNX Runtime's kernel timings, which vary from run to run
    on a shared machine: in this process INT8 is timed the faster form, for fixtures of every scope (tests of the
    timing itself are marked real_kernel_timing)."""
    from openamct.onnx_export import fallback

    _REAL_TIMER.extend([fallback._time, fallback.whole_model_times])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fallback, "_time", lambda models, shape, threads, model_input: {"int8": 1.0, "float": 2.0})
        # whole models: the first named the faster (where a test makes a layer slower on INT8, the deploy model
        # with it float; the deploy model against the float one)
        patch.setattr(fallback, "whole_model_times",
                      lambda models, sample: {name: float(rank) for rank, name in enumerate(models, 1)})
        yield


@pytest.fixture(autouse=True)
def kernel_timings(request, monkeypatch, tmp_path):
    """Each test's kernel timings in a cache of its own; the real timer for tests marked real_kernel_timing."""
    from openamct.onnx_export import fallback

    monkeypatch.setattr(fallback, "CACHE", str(tmp_path / "kernel_timings.json"))
    if "real_kernel_timing" in request.keywords:
        monkeypatch.setattr(fallback, "_time", _REAL_TIMER[0])
        monkeypatch.setattr(fallback, "whole_model_times", _REAL_TIMER[1])
