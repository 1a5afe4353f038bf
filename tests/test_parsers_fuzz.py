"""Property-based tests of the file parsers: a mutated config, record or image-label file either means what the
original meant or is refused with a ConfigError (ValueError for image lists) that gives the file and the line;
never another exception, never a silently different config."""
import json
import re
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_config import CFG, LAYERS  # a .cfg of every section, and the layers of tiny_models.ConvNet

from openamct.amct.config_files import config_from_cfg, load_json, save_json
from openamct.amct.record import read_record, write_record
from openamct.app.data import LabelledImages, Preprocess
from openamct.core.config import ConfigError, LayerConfig, QuantConfig
from openamct.core.layer import LayerRecord

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
POSITION = re.compile(r"^(?P<path>[^:]+):(?P<line>\d+)(:\d+)?: ")


@st.composite
def mutated(draw, text: str):
    """`text` with one edit: a character deleted, replaced or inserted, a line duplicated or deleted, or the end
    cut off."""
    kind = draw(st.sampled_from(["delete", "replace", "insert", "duplicate", "drop", "truncate"]))
    lines = text.splitlines(keepends=True)
    if kind in ("duplicate", "drop"):
        i = draw(st.integers(0, len(lines) - 1))
        lines[i:i + 1] = [lines[i]] * 2 if kind == "duplicate" else []
        return "".join(lines)
    i = draw(st.integers(0, len(text) - 1))
    char = draw(st.sampled_from(string.ascii_letters + string.digits + string.punctuation + " \n"))
    return {"delete": text[:i] + text[i + 1:], "replace": text[:i] + char + text[i + 1:],
            "insert": text[:i] + char + text[i:], "truncate": text[:i]}[kind]


def _assert_positioned(error: Exception, path) -> None:
    match = POSITION.match(str(error))
    assert match and match.group("path") == str(path), f"no file:line in {error!r}"


def _padded(text: str, draw) -> str:
    """The same text with blank lines and comments added between lines: it must mean the same."""
    out = []
    for line in text.splitlines(keepends=True):
        out.append(line)
        out.append(draw(st.sampled_from(["", "\n", "# a comment\n", "   \n"])))
    return "".join(out)


def _parsed_or_refused(text: str, parse, path) -> None:
    path.write_text(text)
    try:
        parse(str(path))
    except ConfigError as error:
        _assert_positioned(error, path)


@SETTINGS
@given(text=mutated(CFG))
def test_mutated_cfg_is_parsed_or_refused_with_its_line(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("cfg") / "q.cfg"  # protobuf refuses unknown fields: see the test below
    _parsed_or_refused(text, lambda p: config_from_cfg(p, LAYERS), path)


@SETTINGS
@given(data=st.data())
def test_cfg_with_comments_and_blank_lines_means_the_same(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("cfg") / "q.cfg"
    original = config_from_cfg(_write(path, CFG), LAYERS)
    assert config_from_cfg(_write(path, _padded(CFG, data.draw)), LAYERS) == original


@SETTINGS
@given(line=st.integers(0, CFG.count("\n")), name=st.from_regex(r"[a-z_]{3,12}", fullmatch=True))
def test_cfg_with_an_unknown_field_is_refused(tmp_path_factory, line, name):
    lines = CFG.splitlines(keepends=True)
    lines.insert(line, f"{name}_x: 1\n")
    path = tmp_path_factory.mktemp("cfg") / "q.cfg"
    with pytest.raises(ConfigError) as error:
        config_from_cfg(_write(path, "".join(lines)), LAYERS)
    _assert_positioned(error.value, path)


def _json_text() -> str:
    config = QuantConfig(layers={name: LayerConfig(quant_enable=name != "fc") for name in LAYERS}, batch_num=3)
    return json.dumps(_roundtrip(config), indent=4) + "\n"


def _roundtrip(config) -> dict:
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        save_json(config, f"{tmp}/c.json")
        with open(f"{tmp}/c.json") as f:
            return json.load(f)


@SETTINGS
@given(text=mutated(_json_text()))
def test_mutated_json_is_parsed_or_refused_with_its_line(tmp_path_factory, text):
    """What loads holds every value the file states: written out again, each key of the file has its value."""
    path = tmp_path_factory.mktemp("json") / "config.json"
    try:
        config = load_json(_write(path, text), known_layers=LAYERS)
    except ConfigError as error:
        _assert_positioned(error, path)
        return
    stated, again = json.loads(text), _roundtrip(config)
    for key, value in stated.items():
        if isinstance(value, dict):
            for group, fields in value.items():
                assert again[key][group] == fields if not isinstance(fields, dict) else \
                    {k: again[key][group][k] for k in fields} == fields
        elif key != "fakequant_precision_mode":
            assert again[key] == value


def _record_text(tmp_path) -> str:
    records = {"conv1": LayerRecord(0.5, -128, (0.25, 0.125), (0, 0)),
               "fc": LayerRecord(0.1, 3, (0.01,), (0,), scale_o=0.2, offset_o=-7, nuq_levels=(-3, 0, 5))}
    write_record(str(tmp_path / "r.txt"), records)
    return (tmp_path / "r.txt").read_text()


@SETTINGS
@given(data=st.data())
def test_mutated_record_is_parsed_or_refused_with_its_line(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("record") / "record.txt"
    _parsed_or_refused(data.draw(mutated(_record_text(path.parent))), read_record, path)


@SETTINGS
@given(field=st.sampled_from(["shift_bit: 3", "skip_fusion: true", 'dst_type: "INT4"', "scale_h: 0.1"]))
def test_record_fields_openamct_does_not_apply_are_refused(tmp_path_factory, field):
    path = tmp_path_factory.mktemp("record") / "record.txt"
    text = _record_text(path.parent).replace("scale_d: 0.5", f"scale_d: 0.5\n    {field}")
    with pytest.raises(ConfigError, match=f"field '{field.split(':')[0]}' is not supported"):
        read_record(_write(path, text))


@SETTINGS
@given(data=st.data())
def test_mutated_image_list_is_read_or_refused_with_its_line(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("images")
    for name in ("a.jpg", "b.jpg", "c.png"):
        (root / name).write_bytes(b"")
    text = "a.jpg 0\nb.jpg 17\nc.png 999\n"
    original = LabelledImages(root, Preprocess(), labels=_write(root / "image_label.txt", text)).samples
    mutation = data.draw(mutated(text))
    try:
        samples = LabelledImages(root, Preprocess(), labels=_write(root / "image_label.txt", mutation)).samples
    except (ValueError, FileNotFoundError) as error:
        message = str(error)
        assert str(root / "image_label.txt") in message or "no images" in message, message
        return
    assert samples == original or all(path.name in ("a.jpg", "b.jpg", "c.png") for path, _ in samples)


def _write(path, text: str) -> str:
    path.write_text(text)
    return str(path)
