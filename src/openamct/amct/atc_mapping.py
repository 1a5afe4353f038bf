"""The ATC mapping file (a JSON dump of a converted model) that a `.cfg`'s `nuq_config` may name: which ops ATC
marked for weight compression."""
import json


def flagged_names(mapping_file: str) -> set:
    """Names of the ops an ATC JSON dump marks `_fe_weight_compress`, with their original ONNX node names."""
    try:
        with open(mapping_file, encoding="utf-8") as f:
            dump = json.load(f)
        ops = [op for graph in dump["graph"] for op in graph["op"]]
    except FileNotFoundError:
        raise ValueError(f"{mapping_file}: mapping file not found") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f"{mapping_file}: not an ATC JSON dump of a model (expected graph[].op[] entries)") from None
    names = set()
    for op in ops:
        attrs = {a.get("key"): a.get("value", {}) for a in op.get("attr", [])}
        if attrs.get("_fe_weight_compress", {}).get("b"):
            names.add(op.get("name", ""))
            names.update(attrs.get("_datadump_original_op_names", {}).get("list", {}).get("s", []))
    return names
