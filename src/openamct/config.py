"""Quantization configs: typed, validated, and their two file forms.

- per-layer JSON (AMCT's `config.json`, spec 3.1): written by `create_quant_config`, read by `quantize_model`;
- simple config `.cfg` (protobuf text format of `proto/calibration_config_pytorch.proto`, spec 3.3), priority
  layer > type > common.
Errors name the file, the line and the field at fault.
"""
import dataclasses
import difflib
import json
import math
import re
from dataclasses import dataclass, field

from google.protobuf import text_format

from . import nuq
from .fileio import write_text
from .proto import calibration_config_pytorch_pb2 as calib_pb2
from .proto import retrain_config_pytorch_pb2 as retrain_pb2

ACT_ALGOS = ("ifmr", "hfmg")
WTS_ALGOS = ("arq_quantize", "nuq_quantize")
CODEBOOKS = ("layer", "channel", "auto")
ROUNDINGS = ("nearest", "gptq")
HFMG_BINS = (1024, 2048, 4096, 8192)


class ConfigError(ValueError):
    """A config file or argument that cannot be used; the message says where."""


def _check(ok: bool, name: str, value, expected: str) -> None:
    if not ok:
        raise ConfigError(f"field '{name}': got {value!r}, expected {expected}")


@dataclass(frozen=True)
class ActQuantParams:
    num_bits: int = 8
    act_algo: str = "ifmr"
    asymmetric: bool | None = None  # None: the global activation_offset decides
    max_percentile: float = 0.999999
    min_percentile: float = 0.999999
    search_range: tuple[float, float] = (0.7, 1.3)
    search_step: float = 0.01
    num_of_bins: int = 4096

    def __post_init__(self):
        _check(self.num_bits in (4, 8), "activation_quant_params.num_bits", self.num_bits, "4 or 8")
        _check(self.act_algo in ACT_ALGOS, "activation_quant_params.act_algo", self.act_algo, " or ".join(ACT_ALGOS))
        for name in ("max_percentile", "min_percentile"):
            value = getattr(self, name)
            _check(0.5 < value <= 1.0, f"activation_quant_params.{name}", value, "a value in (0.5, 1]")
        start, end = self.search_range
        _check(0 < start < end, "activation_quant_params.search_range", list(self.search_range), "0 < start < end")
        _check(0 < self.search_step <= end - start, "activation_quant_params.search_step", self.search_step,
               "0 < step <= end - start")
        _check(self.num_of_bins in HFMG_BINS, "activation_quant_params.num_of_bins", self.num_of_bins,
               " or ".join(map(str, HFMG_BINS)))

    def to_json(self) -> dict:
        out = {"num_bits": self.num_bits, "act_algo": self.act_algo}
        if self.asymmetric is not None:
            out["asymmetric"] = self.asymmetric
        if self.act_algo == "ifmr":
            out.update(max_percentile=self.max_percentile, min_percentile=self.min_percentile,
                       search_range=list(self.search_range), search_step=self.search_step)
        else:
            out["num_of_bins"] = self.num_of_bins
        return out


@dataclass(frozen=True)
class WeightQuantParams:
    num_bits: int = 8
    wts_algo: str = "arq_quantize"
    channel_wise: bool = True
    num_steps: int = 32           # nuq_quantize: levels per codebook
    num_of_iteration: int = 4     # nuq_quantize: rounds of level refits alternating with GPTQ (modules.py)
    codebook: str = "auto"        # nuq_quantize: one codebook per "layer", per output "channel", or "auto" (nuq.py)
    rounding: str = "gptq"        # "nearest", or "gptq": weights chosen to minimise the output error
    bias_correction: bool = True  # correct the output-mean shift that weight quantization leaves

    def __post_init__(self):
        _check(self.num_bits in (4, 6, 7, 8), "weight_quant_params.num_bits", self.num_bits, "4, 6, 7 or 8")
        _check(self.wts_algo in WTS_ALGOS, "weight_quant_params.wts_algo", self.wts_algo, " or ".join(WTS_ALGOS))
        if self.wts_algo == "nuq_quantize":
            _check(isinstance(self.num_steps, int) and 2 <= self.num_steps <= min(256, 2 ** self.num_bits - 1),
                   "weight_quant_params.num_steps", self.num_steps,
                   f"an integer in 2..{min(256, 2 ** self.num_bits - 1)} (fewer levels than the INT{self.num_bits} grid)")
            _check(isinstance(self.num_of_iteration, int) and self.num_of_iteration >= 0,
                   "weight_quant_params.num_of_iteration", self.num_of_iteration, "an integer >= 0")
            _check(self.codebook in CODEBOOKS, "weight_quant_params.codebook", self.codebook, " or ".join(CODEBOOKS))
        _check(self.rounding in ROUNDINGS, "weight_quant_params.rounding", self.rounding, " or ".join(ROUNDINGS))

    def to_json(self) -> dict:
        out = {"num_bits": self.num_bits, "wts_algo": self.wts_algo, "channel_wise": self.channel_wise,
               "rounding": self.rounding, "bias_correction": self.bias_correction}
        if self.wts_algo == "nuq_quantize":
            out.update(num_steps=self.num_steps, num_of_iteration=self.num_of_iteration, codebook=self.codebook)
        return out


@dataclass(frozen=True)
class LayerConfig:
    quant_enable: bool = True
    activation: ActQuantParams = field(default_factory=ActQuantParams)
    weight: WeightQuantParams = field(default_factory=WeightQuantParams)

    def to_json(self) -> dict:
        return {"quant_enable": self.quant_enable, "activation_quant_params": self.activation.to_json(),
                "weight_quant_params": self.weight.to_json()}


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how: global options plus one LayerConfig per quantizable layer name."""
    layers: dict = field(default_factory=dict)
    batch_num: int = 1
    activation_offset: bool = True
    do_fusion: bool = True
    skip_fusion_layers: tuple = ()
    version: int = 1

    def __post_init__(self):
        _check(isinstance(self.batch_num, int) and self.batch_num > 0, "batch_num", self.batch_num, "an integer > 0")

    def asymmetric(self, name: str) -> bool:
        act = self.layers[name].activation
        return self.activation_offset if act.asymmetric is None else act.asymmetric

    def enabled(self) -> list[str]:
        return [name for name, layer in self.layers.items() if layer.quant_enable]

    def to_json(self) -> dict:
        out = {"version": self.version, "batch_num": self.batch_num, "activation_offset": self.activation_offset,
               "do_fusion": self.do_fusion, "skip_fusion_layers": list(self.skip_fusion_layers)}
        out.update({name: layer.to_json() for name, layer in self.layers.items()})
        return out

    def save(self, path: str) -> None:
        write_text(path, json.dumps(self.to_json(), indent=4) + "\n")


def check_names(names, known, what: str) -> None:
    """Raise for names that are not layers of the model, listing near matches."""
    for name in names:
        if name not in known:
            near = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ""
            raise ConfigError(f"{what} '{name}' is not a quantizable layer of the model{hint}")


def _raise(error: Exception):
    raise error


def _line_of(text: str, needle: str) -> int:
    index = text.find(needle)
    return text.count("\n", 0, index) + 1 if index >= 0 else 1


# ---------------------------------------------------------------- per-layer JSON

_GLOBAL_KEYS = {"version", "batch_num", "activation_offset", "do_fusion", "skip_fusion_layers",
                "fakequant_precision_mode"}


def _from_json_layer(obj: dict) -> LayerConfig:
    act = dict(obj.get("activation_quant_params", {}))
    if "search_range" in act:
        act["search_range"] = tuple(act["search_range"])
    return LayerConfig(quant_enable=bool(obj.get("quant_enable", True)), activation=ActQuantParams(**act),
                       weight=WeightQuantParams(**obj.get("weight_quant_params", {})))


def _read_json(path: str, parse_layer, known_layers) -> tuple[str, dict, dict]:
    """The file's text, its global keys, and its layer entries parsed by `parse_layer`; errors carry `path:line`."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        data = json.loads(text)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    layers = {}
    for key, value in data.items():
        if key in _GLOBAL_KEYS:
            continue
        try:
            if not isinstance(value, dict):
                raise ConfigError(f"layer entry must be an object, got {value!r}")
            layers[key] = parse_layer(value)
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"{path}:{_line_of(text, json.dumps(key))}: layer '{key}': {e}") from None
    if known_layers is not None:
        try:
            check_names(layers, known_layers, "layer")
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    return text, data, layers


def load_json(path: str, known_layers=None) -> QuantConfig:
    """Read a per-layer JSON config (create_quant_config's); errors carry `path:line`."""
    text, data, layers = _read_json(path, _from_json_layer, known_layers)
    try:
        return QuantConfig(layers=layers, batch_num=data.get("batch_num", 1),
                           activation_offset=bool(data.get("activation_offset", True)),
                           do_fusion=bool(data.get("do_fusion", True)),
                           skip_fusion_layers=tuple(data.get("skip_fusion_layers", ())),
                           version=data.get("version", 1))
    except ConfigError as e:
        raise ConfigError(f"{path}:{_line_of(text, 'batch_num')}: {e}") from None


# ---------------------------------------------------------------- simple config (.cfg)

def _nuq_params(message, base: WeightQuantParams) -> WeightQuantParams:
    return dataclasses.replace(base, wts_algo="nuq_quantize", num_steps=message.num_steps,
                               num_of_iteration=message.num_of_iteration, codebook=message.codebook)


def _params_from_proto(base: LayerConfig, cfg: calib_pb2.CalibrationConfig) -> LayerConfig:
    act, wts = base.activation, base.weight
    if cfg.HasField("arq_quantize"):
        wts = WeightQuantParams(num_bits=cfg.arq_quantize.quant_bits, channel_wise=cfg.arq_quantize.channel_wise)
    if cfg.HasField("nuq_quantize"):
        wts = _nuq_params(cfg.nuq_quantize, wts)
    if cfg.HasField("ifmr_quantize"):
        m = cfg.ifmr_quantize
        act = ActQuantParams(act_algo="ifmr", max_percentile=round(m.max_percentile, 9),
                             min_percentile=round(m.min_percentile, 9),
                             search_range=(round(m.search_range_start, 6), round(m.search_range_end, 6)),
                             search_step=round(m.search_step, 6),
                             asymmetric=m.asymmetric if m.HasField("asymmetric") else None)
    elif cfg.HasField("hfmg_quantize"):
        m = cfg.hfmg_quantize
        act = ActQuantParams(act_algo="hfmg", num_of_bins=m.num_of_bins,
                             asymmetric=m.asymmetric if m.HasField("asymmetric") else None)
    if cfg.HasField("ada_quantize"):
        raise ConfigError("ada_quantize is not supported yet; use arq_quantize")
    return LayerConfig(quant_enable=base.quant_enable, activation=act, weight=wts)


def parse_cfg(path: str, root=calib_pb2.AMCTConfig):
    """The simple config at `path` as a `root` message (AMCTConfig, or AMCTRetrainConfig for QAT)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    message = root()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as e:
        match = re.match(r"(\d+):(\d+) : (.*)", str(e), re.S)
        where = f"{path}:{match.group(1)}:{match.group(2)}" if match else path
        raise ConfigError(f"{where}: {match.group(3) if match else e}") from None
    return message


NUQ_TYPES = ("Conv2d", "Linear")


def nuq_size_rule(shape, num_steps: int, codebook: str = "auto") -> bool:
    """Without a mapping file, NUQ goes to the Conv2d/Linear layers where it saves at least a quarter of the INT8
    weight bytes, its codebooks (`codebook`, as nuq.per_channel_codebooks decides) counted, and that have at least
    2 x num_steps weights per output channel. A layer that saves less pays NUQ's accuracy for little: a NUQ-32
    layer of 80 weights per channel, with the per-channel codebooks a layer that thin needs, is larger than INT8.
    With fewer weights per channel, too few share each channel's scale for GPTQ to make up for the coarse levels
    (a depthwise conv lost most of NUQ-16's accuracy on EfficientNet-Lite0)."""
    count = math.prod(shape)
    books = shape[0] if nuq.per_channel_codebooks(codebook, shape, num_steps) else 1
    packed = count * nuq.index_bits(num_steps) / 8 + books * num_steps
    return count // shape[0] >= 2 * num_steps and packed <= 0.75 * count


def _checked_cfg(path: str, root, layer_types: dict):
    """Parse a simple config and check its layer names and types against the model's; returns the message and
    `at(needle, fn)`, which runs `fn` and prefixes its ConfigError with `path:line` of `needle`."""
    message = parse_cfg(path, root)
    with open(path, encoding="utf-8") as f:
        text = f.read()

    def at(needle: str, fn):
        try:
            return fn()
        except ConfigError as e:
            raise ConfigError(f"{path}:{_line_of(text, needle)}: {e}") from None

    all_types = {t for types in layer_types.values() for t in types}
    at("skip_layers", lambda: check_names(message.skip_layers, layer_types, "skip_layers entry"))
    for entry in message.override_layer_configs:
        at(entry.layer_name, lambda: check_names([entry.layer_name], layer_types, "override_layer_configs layer"))
    for entry in message.override_layer_types:
        if entry.layer_type not in all_types:
            raise ConfigError(f"{path}:{_line_of(text, entry.layer_type)}: override_layer_types layer_type "
                              f"'{entry.layer_type}' matches no layer (types here: {sorted(all_types)})")
    return message, at


def config_from_cfg(path: str, layer_types: dict, nuq_layers=()) -> QuantConfig:
    """Build the per-layer config from a simple config; `layer_types` maps layer name -> type names and
    `nuq_layers` are the layers `nuq_config` applies to (chosen by the caller from the mapping file or size rule)."""
    message, at = _checked_cfg(path, calib_pb2.AMCTConfig, layer_types)
    if message.HasField("nuq_config"):
        at("num_steps", lambda: _nuq_params(message.nuq_config.nuq_quantize, WeightQuantParams()))
    common = at("common_config", lambda: _params_from_proto(LayerConfig(), message.common_config))
    layers = {}
    for name, types in layer_types.items():
        layer = common
        if name in nuq_layers:
            layer = at("nuq_quantize", lambda: dataclasses.replace(
                layer, weight=_nuq_params(message.nuq_config.nuq_quantize, layer.weight)))
        for entry in message.override_layer_types:
            if entry.layer_type in types:
                layer = at(entry.layer_type, lambda: _params_from_proto(layer, entry.calibration_config))
        for entry in message.override_layer_configs:
            if entry.layer_name == name:
                layer = at(entry.layer_name, lambda: _params_from_proto(layer, entry.calibration_config))
        if layer.weight.wts_algo == "nuq_quantize" and not set(types) & set(NUQ_TYPES):
            at("nuq_quantize", lambda: _raise(ConfigError(f"layer '{name}' ({types[0]}) cannot take nuq_quantize: "
                                                          f"only {' and '.join(NUQ_TYPES)} layers can")))
        skipped = name in message.skip_layers or any(t in message.skip_layer_types for t in types)
        layers[name] = dataclasses.replace(layer, quant_enable=not skipped)
    return at("batch_num", lambda: QuantConfig(
        layers=layers, batch_num=message.batch_num, activation_offset=message.activation_offset,
        do_fusion=message.do_fusion, skip_fusion_layers=tuple(message.skip_fusion_layers)))


# ---------------------------------------------------------------- QAT (retrain) config, spec 3.2 and 3.4

DST_BITS = {"INT4": 4, "INT8": 8}
RETRAIN_WTS_ALGOS = ("arq_retrain", "ulq_retrain")


def _dst_bits(dst_type: str, name: str) -> int:
    _check(dst_type in DST_BITS, name, dst_type, " or ".join(DST_BITS))
    return DST_BITS[dst_type]


@dataclass(frozen=True)
class RetrainDataParams:
    """ULQ activations: a clip range learned in training, initialised from `clip_max`/`clip_min` when given,
    else by IFMR on the first `batch_num` batches."""
    algo: str = "ulq_quantize"
    clip_max: float | None = None
    clip_min: float | None = None
    fixed_min: bool | None = None  # None: clip_min stays 0 where the input is bounded below by 0 (after a ReLU)
    dst_type: str = "INT8"

    def __post_init__(self):
        _check(self.algo == "ulq_quantize", "retrain_data_config.algo", self.algo, "ulq_quantize")
        _dst_bits(self.dst_type, "retrain_data_config.dst_type")
        _check((self.clip_max is None) == (self.clip_min is None), "retrain_data_config.clip_max/clip_min",
               [self.clip_max, self.clip_min], "both or neither")
        if self.clip_max is not None:
            _check(self.clip_max > 0, "retrain_data_config.clip_max", self.clip_max, "a value > 0")
            _check(self.clip_min < 0 or (self.clip_min == 0 and self.fixed_min is not False),
                   "retrain_data_config.clip_min", self.clip_min, "a value < 0 (or 0 with fixed_min)")

    @property
    def num_bits(self) -> int:
        return DST_BITS[self.dst_type]

    def to_json(self) -> dict:
        out = {"algo": self.algo, "dst_type": self.dst_type}
        if self.clip_max is not None:
            out.update(clip_max=self.clip_max, clip_min=self.clip_min)
        if self.fixed_min is not None:
            out["fixed_min"] = self.fixed_min
        return out


@dataclass(frozen=True)
class RetrainWeightParams:
    """arq_retrain: symmetric range recomputed from the weights at every step; ulq_retrain: a learned scale."""
    algo: str = "arq_retrain"
    channel_wise: bool = True
    dst_type: str = "INT8"

    def __post_init__(self):
        _check(self.algo in RETRAIN_WTS_ALGOS, "retrain_weight_config.algo", self.algo, " or ".join(RETRAIN_WTS_ALGOS))
        _dst_bits(self.dst_type, "retrain_weight_config.dst_type")

    @property
    def num_bits(self) -> int:
        return DST_BITS[self.dst_type]

    def to_json(self) -> dict:
        return {"algo": self.algo, "channel_wise": self.channel_wise, "dst_type": self.dst_type}


@dataclass(frozen=True)
class RetrainLayerConfig:
    retrain_enable: bool = True
    data: RetrainDataParams = field(default_factory=RetrainDataParams)
    weight: RetrainWeightParams = field(default_factory=RetrainWeightParams)

    def quant(self) -> LayerConfig:
        """The PTQ view of this layer (bits, channel_wise; plain rounding): what the exported model holds."""
        return LayerConfig(quant_enable=self.retrain_enable, activation=ActQuantParams(num_bits=self.data.num_bits),
                           weight=WeightQuantParams(num_bits=self.weight.num_bits, channel_wise=self.weight.channel_wise,
                                                    rounding="nearest", bias_correction=False))

    def to_json(self) -> dict:
        return {"retrain_enable": self.retrain_enable, "retrain_data_config": self.data.to_json(),
                "retrain_weight_config": self.weight.to_json()}


@dataclass(frozen=True)
class RetrainConfig:
    """What to train quantized and how: `batch_num` (batches of IFMR initialisation) and one entry per layer."""
    layers: dict = field(default_factory=dict)
    batch_num: int = 1
    version: int = 1

    def __post_init__(self):
        _check(isinstance(self.batch_num, int) and self.batch_num > 0, "batch_num", self.batch_num, "an integer > 0")

    def quant_config(self) -> QuantConfig:
        return QuantConfig(layers={name: layer.quant() for name, layer in self.layers.items()},
                           batch_num=self.batch_num)

    def to_json(self) -> dict:
        out = {"version": self.version, "batch_num": self.batch_num}
        out.update({name: layer.to_json() for name, layer in self.layers.items()})
        return out

    def save(self, path: str) -> None:
        write_text(path, json.dumps(self.to_json(), indent=4) + "\n")


def _retrain_layer_from_json(obj: dict) -> RetrainLayerConfig:
    return RetrainLayerConfig(retrain_enable=bool(obj.get("retrain_enable", True)),
                              data=RetrainDataParams(**obj.get("retrain_data_config", {})),
                              weight=RetrainWeightParams(**obj.get("retrain_weight_config", {})))


def load_retrain_json(path: str, known_layers=None) -> RetrainConfig:
    """Read a QAT JSON config (create_quant_retrain_config's); errors carry `path:line`."""
    text, data, layers = _read_json(path, _retrain_layer_from_json, known_layers)
    try:
        return RetrainConfig(layers=layers, batch_num=data.get("batch_num", 1), version=data.get("version", 1))
    except ConfigError as e:
        raise ConfigError(f"{path}:{_line_of(text, 'batch_num')}: {e}") from None


def _dst_name(value: int) -> str:
    return retrain_pb2.DataType.Name(value)


def _retrain_from_proto(base: RetrainLayerConfig, entry) -> RetrainLayerConfig:
    data, weight = base.data, base.weight
    if entry.HasField("retrain_data_quant_config") and entry.retrain_data_quant_config.HasField("ulq_quantize"):
        m = entry.retrain_data_quant_config.ulq_quantize
        clip = (round(m.clip_max_min.clip_max, 6), round(m.clip_max_min.clip_min, 6)) \
            if m.HasField("clip_max_min") else (None, None)
        data = RetrainDataParams(clip_max=clip[0], clip_min=clip[1],
                                 fixed_min=m.fixed_min if m.HasField("fixed_min") else None,
                                 dst_type=_dst_name(m.dst_type))
    if entry.HasField("retrain_weight_quant_config"):
        config = entry.retrain_weight_quant_config
        algo = config.WhichOneof("quant_algo")
        if algo:
            m = getattr(config, algo)
            weight = RetrainWeightParams(algo=algo, channel_wise=m.channel_wise, dst_type=_dst_name(m.dst_type))
    return dataclasses.replace(base, data=data, weight=weight)


def retrain_config_from_cfg(path: str, layer_types: dict) -> RetrainConfig:
    """Build the QAT per-layer config from a `retrain_config_pytorch.proto` simple config; priority
    layer > type > global; skip_* and quant_skip_* both skip."""
    message, at = _checked_cfg(path, retrain_pb2.AMCTRetrainConfig, layer_types)
    at("quant_skip_layers", lambda: check_names(message.quant_skip_layers, layer_types, "quant_skip_layers entry"))
    common = at("retrain_", lambda: _retrain_from_proto(RetrainLayerConfig(), message))
    skip_layers = set(message.skip_layers) | set(message.quant_skip_layers)
    skip_types = set(message.skip_layer_types) | set(message.quant_skip_types)
    layers = {}
    for name, types in layer_types.items():
        layer = common
        for entry in message.override_layer_types:
            if entry.layer_type in types:
                layer = at(entry.layer_type, lambda: _retrain_from_proto(layer, entry))
        for entry in message.override_layer_configs:
            if entry.layer_name == name:
                layer = at(entry.layer_name, lambda: _retrain_from_proto(layer, entry))
        skipped = name in skip_layers or bool(skip_types & set(types))
        layers[name] = dataclasses.replace(layer, retrain_enable=not skipped)
    return at("batch_num", lambda: RetrainConfig(layers=layers, batch_num=message.batch_num))
