"""Record file (`record.txt`): AMCT's ScaleOffsetRecord in protobuf text format (spec 3.5), to and from the
core's LayerRecord."""
import os

from ..core.config import ConfigError
from ..core.fileio import write_text
from ..core.layer import LayerRecord
from .config_files import parse_text
from .proto import scale_offset_record_pytorch_pb2 as record_pb2

_HONOURED = {"scale_d", "offset_d", "scale_w", "offset_w", "scale_o", "offset_o", "nuq_levels", "tensor_balance_factor"}
_WRITTEN = {}  # absolute path -> (text, records) of the record this process last wrote there


def write_record(path: str, records: dict) -> None:
    """`records`: layer name -> LayerRecord."""
    message = record_pb2.ScaleOffsetRecord()
    for name, record in records.items():
        item = message.record.add()
        item.key = name
        value = item.value
        value.scale_d, value.offset_d = record.scale_d, record.offset_d
        value.scale_w.extend(record.scale_w)
        value.offset_w.extend(record.offset_w)
        if record.scale_o is not None:
            value.scale_o, value.offset_o = record.scale_o, record.offset_o
        value.nuq_levels.extend(record.nuq_levels)
        value.tensor_balance_factor.extend(record.tensor_balance_factor)
    _write(path, message, dict(records))


def write_balance_factors(path: str, factors: dict) -> None:
    """The record quantize_preprocess writes (layer name -> DMQ factors): tensor_balance_factor alone, as AMCT's."""
    message = record_pb2.ScaleOffsetRecord()
    for name, values in factors.items():
        item = message.record.add()
        item.key = name
        item.value.tensor_balance_factor.extend(values)
    _write(path, message, None)


def _write(path: str, message, records) -> None:
    text = str(message)  # protobuf text format, from upb's C printer: 4x faster than text_format.MessageToString
    write_text(path, text)
    if records is None:
        _WRITTEN.pop(os.path.abspath(path), None)
    else:
        _WRITTEN[os.path.abspath(path)] = (text, records)


def read_record(path: str) -> dict:
    """Layer name -> LayerRecord; errors carry `path:line`. A record this process wrote, unchanged since, is not
    parsed again (Python's protobuf text parser takes seconds on a large model's per-channel scales)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: record file not found") from None
    written = _WRITTEN.get(os.path.abspath(path))
    if written is not None and written[0] == text:
        return dict(written[1])
    message = parse_text(path, text, record_pb2.ScaleOffsetRecord())
    out = {}
    for item in message.record:
        value = item.value
        for field, content in value.ListFields():
            if field.name not in _HONOURED and content != field.default_value:
                line = text.count("\n", 0, max(text.find(field.name), 0)) + 1
                raise ConfigError(f"{path}:{line}: layer '{item.key}': field '{field.name}' is not supported by "
                                  f"openamct (a record of another tool?)")
        output = value.HasField("scale_o")
        out[item.key] = LayerRecord(scale_d=value.scale_d, offset_d=value.offset_d, scale_w=tuple(value.scale_w),
                                    offset_w=tuple(value.offset_w), scale_o=value.scale_o if output else None,
                                    offset_o=value.offset_o if output else None,
                                    nuq_levels=tuple(value.nuq_levels),
                                    tensor_balance_factor=tuple(value.tensor_balance_factor))
    return out
