"""Record file (`record.txt`): AMCT's ScaleOffsetRecord in protobuf text format (spec 3.5), to and from the
core's LayerRecord."""
from google.protobuf import text_format

from ..core.config import ConfigError
from ..core.fileio import write_text
from ..core.layer import LayerRecord
from .proto import scale_offset_record_pytorch_pb2 as record_pb2


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
    write_text(path, text_format.MessageToString(message))


def read_record(path: str) -> dict:
    """Layer name -> LayerRecord; errors carry `path:line`."""
    message = record_pb2.ScaleOffsetRecord()
    try:
        with open(path, encoding="utf-8") as f:
            text_format.Parse(f.read(), message)
    except FileNotFoundError:
        raise ConfigError(f"{path}: record file not found") from None
    except text_format.ParseError as e:
        raise ConfigError(f"{path}:{e}") from None
    out = {}
    for item in message.record:
        value = item.value
        output = value.HasField("scale_o")
        out[item.key] = LayerRecord(scale_d=value.scale_d, offset_d=value.offset_d, scale_w=tuple(value.scale_w),
                                    offset_w=tuple(value.offset_w), scale_o=value.scale_o if output else None,
                                    offset_o=value.offset_o if output else None,
                                    nuq_levels=tuple(value.nuq_levels))
    return out
