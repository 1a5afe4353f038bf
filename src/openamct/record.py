"""Record file (`record.txt`): AMCT's ScaleOffsetRecord in protobuf text format (spec 3.5)."""
from google.protobuf import text_format

from .config import ConfigError
from .fileio import write_text
from .proto import scale_offset_record_pytorch_pb2 as record_pb2


def write_record(path: str, entries: dict) -> None:
    """`entries`: layer name -> dict of SingleLayerRecord fields."""
    message = record_pb2.ScaleOffsetRecord()
    for name, fields in entries.items():
        item = message.record.add()
        item.key = name
        for key, value in fields.items():
            target = getattr(item.value, key)
            if isinstance(value, (list, tuple)):
                target.extend(value)
            else:
                setattr(item.value, key, value)
    write_text(path, text_format.MessageToString(message))


def read_record(path: str) -> dict:
    """Layer name -> SingleLayerRecord message; errors carry `path:line`."""
    message = record_pb2.ScaleOffsetRecord()
    try:
        with open(path, encoding="utf-8") as f:
            text_format.Parse(f.read(), message)
    except FileNotFoundError:
        raise ConfigError(f"{path}: record file not found") from None
    except text_format.ParseError as e:
        raise ConfigError(f"{path}:{e}") from None
    return {item.key: item.value for item in message.record}
