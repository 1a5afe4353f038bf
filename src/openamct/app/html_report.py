"""The report people look at: one self-contained HTML file beside `quant_report.json` (plots embedded as PNG data,
no script, no network), and the plots it holds.

    write_html(report, "out/quant_report.html")   # report: the dict written to quant_report.json

It shows what the JSON holds, most useful first: accuracy before and after, the configuration chosen (weight
format per layer, when mixed precision chose them), the accuracy-vs-size curve of the configurations tried, per-layer
sensitivity and SQNR, coverage, parity and the output files.
"""
from __future__ import annotations

import base64
import html
import io
import math

from ..core.fileio import write_bytes, write_text


def _figure(width: float, height: float = 4.2):
    import matplotlib
    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), dpi=100)


def _save(figure, path: str | None) -> bytes:
    """The figure as PNG bytes, also written to `path` when given."""
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    data = buffer.getvalue()
    if path:
        write_bytes(path, data)
    return data


def plot_tradeoff(points: list, path: str | None = None, *, metric: str = "top1_final", ylabel: str = "top-1 (%)",
                  title: str = "") -> bytes:
    """Accuracy against weight size of the configurations tried. `points`: dicts with "label", "size" (relative to
    INT8), the `metric` and "ok" (within the target); uniform configurations are labelled on the plot, the search's
    drawn as a path, the one marked "chosen" ringed."""
    figure = _figure(7.5, 4.6)
    axes = figure.add_subplot()
    uniform = [p for p in points if not p["label"].startswith("path")]
    path_points = sorted((p for p in points if p["label"].startswith("path")), key=lambda p: p["size"])
    for point in uniform:
        axes.scatter(point["size"], point[metric], color="tab:gray", zorder=3)
        axes.annotate(point["label"], (point["size"], point[metric]), textcoords="offset points", xytext=(5, 4),
                      fontsize=8)
    if path_points:
        axes.plot([p["size"] for p in path_points], [p[metric] for p in path_points], "-o", color="tab:blue",
                  label="mixed precision tried", zorder=2)
        axes.legend(loc="lower right", fontsize=8)
    for point in points:
        if point.get("chosen"):
            axes.scatter(point["size"], point[metric], s=180, facecolors="none", edgecolors="tab:red", linewidths=2,
                         zorder=4, label="chosen")
            axes.legend(loc="lower right", fontsize=8)
    axes.set_xlabel("weight bytes relative to INT8")
    axes.set_ylabel(ylabel)
    axes.set_xscale("log", base=2)
    axes.grid(alpha=0.3)
    axes.set_title(title or "Accuracy against weight size", fontsize=10)
    return _save(figure, path)


def plot_sensitivity(losses: dict, path: str | None = None, *, title: str = "") -> bytes:
    """Bar chart of each layer's output loss when quantized alone (log scale), in network order."""
    names = list(losses)
    figure = _figure(min(max(6.0, 0.16 * len(names) + 2.0), 40.0))
    axes = figure.add_subplot()
    floor = min([v for v in losses.values() if v > 0] or [1e-12]) / 10
    axes.bar(range(len(names)), [max(losses[n], floor) for n in names], color="tab:purple")
    axes.set_yscale("log")
    axes.set_xticks(list(range(len(names))))
    axes.set_xticklabels(names, rotation=90, fontsize=6 if len(names) > 40 else 8)
    axes.set_xlim(-0.7, len(names) - 0.3)
    axes.set_ylabel("output loss, layer quantized alone")
    axes.set_title(title or "Per-layer sensitivity (higher: costs more)", fontsize=10)
    axes.grid(axis="y", alpha=0.3)
    return _save(figure, path)


def _image(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _table(header: list, rows: list) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_text(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _text(value) -> str:
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.4g}"
    return "" if value is None else str(value)


STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f3f3f3}img{max-width:100%}.ok{color:#176117}.bad{color:#a11}.small{font-size:.85em;color:#555}"""


def write_html(report: dict, path: str, *, plots: dict | None = None) -> str:
    """Write the report as one self-contained HTML file at `path` (atomically); `plots`: title -> PNG bytes shown
    in their own sections. Returns `path`."""
    parts = [f"<h1>{html.escape(str(report.get('model', 'model')))}: quantization report</h1>"]
    evaluation = report.get("evaluation") or {}
    if evaluation.get("accuracy"):
        rows = [[key, 100 * acc["top1"], 100 * acc["top5"], evaluation["top1_drop_points"].get(key)]
                for key, acc in evaluation["accuracy"].items()]
        parts += [f"<h2>Accuracy on {evaluation['images']} images</h2>",
                  _table(["model", "top-1 %", "top-5 %", "top-1 drop (points)"], rows)]
    search = report.get("mixed_precision")
    if search:
        chosen = search["choice"]
        counts = {f: list(chosen.values()).count(f) for f in sorted(set(chosen.values()))}
        parts += ["<h2>Mixed precision</h2>",
                  f"<p>Target: {html.escape(search['target'])}. Chosen: weight size {_text(search['size'])} of "
                  f"INT8; formats {html.escape(', '.join(f'{k}: {v} layers' for k, v in counts.items()))}.</p>",
                  _table(["configuration", "size vs INT8", "metric", "drop", "within target", "time (s)"],
                         [[t["label"], t["size"], t["metric"], t["drop"], t["ok"], t["seconds"]]
                          for t in search["trials"]])]
    for title, data in (plots or {}).items():
        parts += [f"<h2>{html.escape(title)}</h2>", _image(data, title)]
    layers = report.get("layers") or {}
    if layers:
        columns = list(dict.fromkeys(key for row in layers.values() for key in row))  # in the rows' order
        parts += ["<h2>Layers</h2>", _table(["layer"] + columns, [[n] + [row.get(c) for c in columns]
                                                                  for n, row in layers.items()])]
    if report.get("parity"):
        parts += ["<h2>Parity with the PyTorch simulation</h2>",
                  _table(["model", "ok", "details"], [[kind, result.get("ok"), {k: v for k, v in result.items()
                                                                              if k != "ok"}]
                                                       for kind, result in report["parity"].items()])]
    if report.get("paths"):
        parts += ["<h2>Files</h2>", _table(["what", "path"], list(report["paths"].items()))]
    if report.get("timings_s"):
        parts += ["<h2>Time</h2>", _table(["step", "seconds"], list(report["timings_s"].items()))]
    document = (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>"
                f"{html.escape(str(report.get('model', '')))} quantization report</title><style>{STYLE}</style>"
                f"</head><body>{''.join(parts)}</body></html>\n")
    write_text(path, document)
    return path
