"""The package's layout: floors that import only downwards (core <- onnx_export <- amct <- app), no import cycle,
modules of a readable size, and a native core that leaves logging to its user."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "openamct"
FLOORS = {"core": 0, "onnx_export": 1, "amct": 2, "app": 3}


def _modules() -> dict:
    """Module name -> path of every openamct module (generated protobuf code aside)."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        if path.name.endswith("_pb2.py"):
            continue
        parts = path.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict) -> set:
    """The openamct modules `name` imports (anywhere in the file), resolved to modules or packages."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {m for m in found if m in modules}


def _floor(name: str) -> float:
    """The package's own __init__ (the public API) stands between amct and app; `python -m openamct` on top."""
    parts = name.split(".")
    return 2.5 if len(parts) == 1 else 4 if parts[1] == "__main__" else FLOORS[parts[1]]


def test_floors_import_only_downwards():
    modules = _modules()
    assert {"openamct.core.api", "openamct.onnx_export.qdq", "openamct.amct.config_files", "openamct.app.cli"} <= \
        set(modules)
    upward = []
    for name, path in modules.items():
        floor = _floor(name)
        for target in _imports(name, path, modules):
            if _floor(target) > floor:
                upward.append(f"{name} -> {target}")
    assert not upward, "imports from a floor above: " + ", ".join(upward)


def test_no_import_cycle():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for target in graph[node]:
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[node] = "done"

    for name in graph:
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_modules_stay_readable():
    long = {str(path.relative_to(SRC)): n for path in _modules().values()
            if (n := len(path.read_text().splitlines())) > 400}
    assert not long, f"modules over 400 lines: {long}"


@pytest.mark.parametrize("call, logs", [("native", False), ("amct", True)])
def test_only_the_amct_calls_write_amct_log(tmp_path, call, logs):
    script = f"""
import sys, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
from tiny_models import ConvNet, convnet
import openamct as amct
model, x = convnet(), ConvNet.example_input()
if {call!r} == "native":
    qmodel = amct.quantize(model, amct.default_config(model, x), lambda m: m(ConvNet.example_input(4)), x)
    amct.export(qmodel, "out/net", x)
else:
    amct.create_quant_config("config.json", model, x)
"""
    env = dict(os.environ, PYTHONPATH=str(SRC))
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "amct_log" / "amct_pytorch.log").exists() == logs
    assert ("[AMCT]" in run.stderr) == logs  # AMCT's console format only with the AMCT calls
