"""AMCT's config files, translated to and from the core's config (core/config.py):

- per-layer JSON (AMCT's `config.json`, spec 3.1): written by create_quant_config, read by quantize_model; and its
  QAT form (create_quant_retrain_config, create_quant_retrain_model);
- simple config `.cfg` (protobuf text of `proto/calibration_config_pytorch.proto` / `retrain_config_pytorch.proto`,
  spec 3.3/3.4), priority layer > type > common, turned into ordered core rules;
- openamct's `block_reconstruction` object in the JSON (core/reconstruction.py), which the `.cfg` does not have.

Errors name the file, the line and the field at fault. Fields openamct cannot honour are refused, never ignored.
"""
import dataclasses
import json
import re

from google.protobuf import text_format

from ..core.config import (
    ActQuantParams,
    ConfigError,
    LayerConfig,
    QuantConfig,
    ReconstructionParams,
    RetrainConfig,
    RetrainDataParams,
    RetrainLayerConfig,
    RetrainWeightParams,
    Rule,
    WeightQuantParams,
    apply_rules,
    check,
    check_migration_strength,
    check_names,
    check_nuq_types,
)
from ..core.fileio import write_text
from .proto import calibration_config_pytorch_pb2 as calib_pb2
from .proto import retrain_config_pytorch_pb2 as retrain_pb2

VERSION = 1
VERSION_KEY = '"version"'
FP16_REFUSED = ("fakequant_precision_mode FORCE_FP16_QUANT is not supported: openamct's fake-quant model computes in "
                "float32, bit-exact with its deploy model; remove the field")


def _line_of(text: str, needle: str) -> int:
    index = text.find(needle)
    return text.count("\n", 0, index) + 1 if index >= 0 else 1


def _field_line(text: str, error: ConfigError) -> int:
    """The line of the JSON key a global field's error names."""
    match = re.search(r"field '([\w]+)", str(error))
    return _line_of(text, f'"{match.group(1)}"') if match else 1


# ---------------------------------------------------------------- per-layer JSON

def _act_json(p: ActQuantParams) -> dict:
    out = {"num_bits": p.num_bits, "act_algo": p.act_algo}
    if p.asymmetric is not None:
        out["asymmetric"] = p.asymmetric
    if p.act_algo == "ifmr":
        out.update(max_percentile=p.max_percentile, min_percentile=p.min_percentile,
                   search_range=list(p.search_range), search_step=p.search_step)
    else:
        out["num_of_bins"] = p.num_of_bins
    return out


def _weight_json(p) -> dict:
    adaround = p.rounding == "adaround"
    out = {"num_bits": p.num_bits, "wts_algo": "ada_quantize" if adaround else p.wts_algo,
           "channel_wise": p.channel_wise, "rounding": p.rounding, "bias_correction": p.bias_correction}
    if p.nuq:
        out.update(num_steps=p.num_steps, num_of_iteration=p.num_of_iteration, codebook=p.codebook)
    if adaround:
        out.update(num_iteration=p.num_iteration, reg_param=p.reg_param, beta_range=list(p.beta_range),
                   warm_start=p.warm_start)
    return out


def _tuples(params) -> dict:  # JSON parameters with their lists as tuples, the ranges' type (search_range, ...)
    return {key: tuple(value) if isinstance(value, list) else value for key, value in dict(params).items()}


def _weight_from_json(obj: dict) -> WeightQuantParams:
    """AMCT's `wts_algo: "ada_quantize"`: ARQ's grid with `rounding: "adaround"` (not yet with NUQ)."""
    params = _tuples(obj)
    if params.get("wts_algo") == "ada_quantize":
        check(params.get("rounding", "adaround") == "adaround", "weight_quant_params.rounding",
              params.get("rounding"), "adaround (or no rounding) with wts_algo ada_quantize")
        params.update(wts_algo="arq_quantize", rounding="adaround")
    return WeightQuantParams(**params)


def save_json(config: QuantConfig, path: str) -> None:
    out = {"version": VERSION, "batch_num": config.batch_num, "activation_offset": config.activation_offset,
           "do_fusion": config.do_fusion, "skip_fusion_layers": list(config.skip_fusion_layers)}
    if config.reconstruction is not None:
        out["block_reconstruction"] = {k: list(v) if isinstance(v, tuple) else v
                                       for k, v in dataclasses.asdict(config.reconstruction).items()}
    for name, layer in config.layers.items():
        dmq = {} if layer.dmq_balancer_param is None else {"dmq_balancer_param": layer.dmq_balancer_param}
        out[name] = {"quant_enable": layer.quant_enable, **dmq, "activation_quant_params": _act_json(layer.activation),
                     "weight_quant_params": _weight_json(layer.weight)}
    write_text(path, json.dumps(out, indent=4) + "\n")


def save_retrain_json(config: RetrainConfig, path: str) -> None:
    out = {"version": VERSION, "batch_num": config.batch_num}
    for name, layer in config.layers.items():
        data = {"algo": layer.data.algo, "dst_type": layer.data.dst_type}
        if layer.data.clip_max is not None:
            data.update(clip_max=layer.data.clip_max, clip_min=layer.data.clip_min)
        if layer.data.fixed_min is not None:
            data["fixed_min"] = layer.data.fixed_min
        weight = {"algo": layer.weight.algo, "channel_wise": layer.weight.channel_wise,
                  "dst_type": layer.weight.dst_type}
        out[name] = {"retrain_enable": layer.retrain_enable, "retrain_data_config": data,
                     "retrain_weight_config": weight}
    write_text(path, json.dumps(out, indent=4) + "\n")


def _flag(obj: dict, key: str, default: bool = True) -> bool:
    value = obj.get(key, default)
    check(isinstance(value, bool), key, value, "true or false")
    return value


def _names(obj: dict, key: str) -> tuple:
    value = obj.get(key, [])
    check(isinstance(value, list) and all(isinstance(v, str) for v in value), key, value, "a list of layer names")
    return tuple(value)


def _fields(obj: dict, known: tuple, where: str) -> None:
    for key in obj:
        if key not in known:
            raise ConfigError(f"{where}: unknown field '{key}' (expected {', '.join(known)})")


def _reconstruction_from_json(value) -> ReconstructionParams | None:
    if value is None:
        return None
    check(isinstance(value, dict), "block_reconstruction", value, "an object of reconstruction fields")
    _fields(value, tuple(f.name for f in dataclasses.fields(ReconstructionParams)), "field 'block_reconstruction'")
    return ReconstructionParams(**_tuples(value))


def _layer_from_json(obj: dict) -> LayerConfig:
    _fields(obj, ("quant_enable", "dmq_balancer_param", "activation_quant_params", "weight_quant_params"),
            "layer entry")
    return LayerConfig(quant_enable=_flag(obj, "quant_enable"),
                       activation=ActQuantParams(**_tuples(obj.get("activation_quant_params", {}))),
                       weight=_weight_from_json(obj.get("weight_quant_params", {})),
                       dmq_balancer_param=obj.get("dmq_balancer_param"))


def _retrain_layer_from_json(obj: dict) -> RetrainLayerConfig:
    _fields(obj, ("retrain_enable", "retrain_data_config", "retrain_weight_config"), "layer entry")
    return RetrainLayerConfig(retrain_enable=_flag(obj, "retrain_enable"),
                              data=RetrainDataParams(**obj.get("retrain_data_config", {})),
                              weight=RetrainWeightParams(**obj.get("retrain_weight_config", {})))


def _read_json(path: str, parse_layer, global_keys, known_layers) -> tuple[str, dict, dict]:
    """The file's text, its global keys, and its layer entries parsed by `parse_layer`; errors carry `path:line`."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        data = json.loads(text)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: expected a JSON object of global fields and layer entries")
    version, mode = data.get("version", VERSION), data.get("fakequant_precision_mode", "DEFAULT")
    if version != VERSION:
        raise ConfigError(f"{path}:{_line_of(text, VERSION_KEY)}: field 'version': got {version!r}, expected "
                          f"{VERSION} (a config written by another release: create it again)")
    if mode != "DEFAULT":
        raise ConfigError(f"{path}:{_line_of(text, 'fakequant_precision_mode')}: " + (
            FP16_REFUSED if mode == "FORCE_FP16_QUANT" else
            f"field 'fakequant_precision_mode': got {mode!r}, expected DEFAULT"))
    layers = {}
    for key, value in data.items():
        if key in global_keys:
            continue
        try:
            if known_layers is not None:
                check_names([key], known_layers, "layer")
            if not isinstance(value, dict):
                raise ConfigError(f"layer entry must be an object, got {value!r}")
            layers[key] = parse_layer(value)
        except ConfigError as e:
            where = f"{path}:{_line_of(text, json.dumps(key))}"
            raise ConfigError(f"{where}: {e}" if str(e).startswith("layer '") else f"{where}: layer '{key}': {e}") \
                from None
        except TypeError as e:
            raise ConfigError(f"{path}:{_line_of(text, json.dumps(key))}: layer '{key}': {e}") from None
    return text, data, layers


def load_json(path: str, known_layers=None) -> QuantConfig:
    """Read a per-layer JSON config (create_quant_config's); errors carry `path:line`."""
    keys = {"version", "batch_num", "activation_offset", "do_fusion", "skip_fusion_layers", "fakequant_precision_mode",
            "block_reconstruction"}
    text, data, layers = _read_json(path, _layer_from_json, keys, known_layers)
    try:
        return QuantConfig(layers=layers, batch_num=data.get("batch_num", 1),
                           activation_offset=_flag(data, "activation_offset"), do_fusion=_flag(data, "do_fusion"),
                           skip_fusion_layers=_names(data, "skip_fusion_layers"),
                           reconstruction=_reconstruction_from_json(data.get("block_reconstruction")))
    except ConfigError as e:
        raise ConfigError(f"{path}:{_field_line(text, e)}: {e}") from None


def load_retrain_json(path: str, known_layers=None) -> RetrainConfig:
    """Read a QAT JSON config (create_quant_retrain_config's); errors carry `path:line`."""
    text, data, layers = _read_json(path, _retrain_layer_from_json, {"version", "batch_num"}, known_layers)
    try:
        return RetrainConfig(layers=layers, batch_num=data.get("batch_num", 1))
    except ConfigError as e:
        raise ConfigError(f"{path}:{_field_line(text, e)}: {e}") from None


# ---------------------------------------------------------------- simple config (.cfg)

def parse_cfg(path: str, root=calib_pb2.AMCTConfig):
    """The simple config at `path` as a `root` message (AMCTConfig, or AMCTRetrainConfig for QAT)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    return parse_text(path, text, root())


def parse_text(path: str, text: str, message):
    """`message` filled from protobuf text; a syntax error becomes a ConfigError at `path:line:column`."""
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as e:
        match = re.match(r"(\d+):(\d+) : (.*)", str(e), re.S)
        where = f"{path}:{match.group(1)}:{match.group(2)}" if match else f"{path}:1"
        raise ConfigError(f"{where}: {match.group(3) if match else e}") from None
    return message


def _checked_cfg(path: str, root, layer_types: dict):
    """Parse a simple config and check its layer names and types against the model's; returns the message and
    `at(needle, fn, *args)`, which runs `fn(*args)` and prefixes its ConfigError with `path:line` of `needle`."""
    message = parse_cfg(path, root)
    with open(path, encoding="utf-8") as f:
        text = f.read()

    def at(needle: str, fn, *args):
        try:
            return fn(*args)
        except ConfigError as e:
            raise ConfigError(f"{path}:{_line_of(text, needle)}: {e}") from None

    all_types = {t for types in layer_types.values() for t in types}
    at("skip_layers", lambda: check_names(message.skip_layers, layer_types, "skip_layers entry"))
    for entry in message.override_layer_configs:
        at(entry.layer_name, check_names, [entry.layer_name], layer_types, "override_layer_configs layer")
    for entry in message.override_layer_types:
        if entry.layer_type not in all_types:
            raise ConfigError(f"{path}:{_line_of(text, entry.layer_type)}: override_layer_types layer_type "
                              f"'{entry.layer_type}' matches no layer (types here: {sorted(all_types)})")
    return message, at


def _act_bits(message) -> int:
    """ifmr/hfmg dst_type: INT8 (or unset) is openamct's 8-bit activations; INT16 is refused."""
    if message.dst_type == calib_pb2.INT16:
        raise ConfigError("field 'dst_type': INT16 activations are not supported (INT8 only in a .cfg; 4-bit "
                          "activations through the JSON config's num_bits)")
    return 8


def _changes(cfg: calib_pb2.CalibrationConfig) -> dict:
    """A CalibrationConfig as rule changes: arq_quantize and ifmr/hfmg replace the weight or activation settings
    whole, nuq_quantize changes the NUQ fields of what is there."""
    changes = {}
    if cfg.HasField("ada_quantize"):
        m = cfg.ada_quantize
        changes["weight"] = WeightQuantParams(
            rounding="adaround", channel_wise=m.channel_wise, num_iteration=m.num_iteration,
            reg_param=round(m.reg_param, 6), beta_range=(round(m.beta_range_start, 6), round(m.beta_range_end, 6)),
            warm_start=round(m.warm_start, 6))
    if cfg.HasField("dmq_balancer"):  # a float32 in the message: rounded back to the number the file holds
        changes["dmq_balancer_param"] = round(cfg.dmq_balancer.migration_strength, 6)
        check_migration_strength(changes["dmq_balancer_param"], "dmq_balancer.migration_strength")
    if cfg.HasField("arq_quantize"):
        changes["weight"] = WeightQuantParams(num_bits=cfg.arq_quantize.quant_bits,
                                              channel_wise=cfg.arq_quantize.channel_wise)
    if cfg.HasField("nuq_quantize"):
        changes["weight"] = _nuq_changes(cfg.nuq_quantize)
    if cfg.HasField("ifmr_quantize"):
        m = cfg.ifmr_quantize
        changes["activation"] = ActQuantParams(
            num_bits=_act_bits(m), act_algo="ifmr", max_percentile=round(m.max_percentile, 9),
            min_percentile=round(m.min_percentile, 9),
            search_range=(round(m.search_range_start, 6), round(m.search_range_end, 6)),
            search_step=round(m.search_step, 6), asymmetric=m.asymmetric if m.HasField("asymmetric") else None)
    elif cfg.HasField("hfmg_quantize"):
        m = cfg.hfmg_quantize
        changes["activation"] = ActQuantParams(num_bits=_act_bits(m), act_algo="hfmg", num_of_bins=m.num_of_bins,
                                               asymmetric=m.asymmetric if m.HasField("asymmetric") else None)
    return changes


def _nuq_changes(message) -> dict:
    changes = {"wts_algo": "nuq_quantize", "num_steps": message.num_steps,
               "num_of_iteration": message.num_of_iteration, "codebook": message.codebook}
    WeightQuantParams(**changes)  # checks the values here, where the error can name the line
    return changes


def config_from_cfg(path: str, layer_types: dict, nuq_layers=()) -> QuantConfig:
    """Build the per-layer config from a simple config; `layer_types` maps layer name -> type names and
    `nuq_layers` are the layers `nuq_config` applies to (chosen by the caller from the mapping file or the size
    rule)."""
    message, at = _checked_cfg(path, calib_pb2.AMCTConfig, layer_types)
    if message.fakequant_precision_mode == calib_pb2.FORCE_FP16_QUANT:
        at("fakequant_precision_mode", _raise, ConfigError(FP16_REFUSED))
    common = at("common_config", lambda: _changes(message.common_config))
    rules = [Rule(**common)] if common else []
    if message.HasField("nuq_config"):
        nuq = at("num_steps", lambda: _nuq_changes(message.nuq_config.nuq_quantize))
        if nuq_layers:
            rules.append(Rule(tuple(nuq_layers), weight=nuq))
    for entry in message.override_layer_types:
        rules.append(Rule(types=entry.layer_type, **at(entry.layer_type, _changes, entry.calibration_config)))
    for entry in message.override_layer_configs:
        rules.append(Rule(entry.layer_name, **at(entry.layer_name, _changes, entry.calibration_config)))
    skipped = [name for name, types in layer_types.items()
               if name in message.skip_layers or set(types) & set(message.skip_layer_types)]
    if skipped:
        rules.append(Rule(tuple(skipped), quant_enable=False))
    layers = apply_rules(LayerConfig(), rules, layer_types, {})
    at("nuq_quantize", lambda: check_nuq_types(layers, layer_types))
    return at("batch_num", lambda: QuantConfig(
        layers=layers, batch_num=message.batch_num, activation_offset=message.activation_offset,
        do_fusion=message.do_fusion, skip_fusion_layers=tuple(message.skip_fusion_layers)))


def _raise(error: Exception):
    raise error


def retrain_cfg(batch_num: int, weight_bits: int, int8_layers=()) -> str:
    """A QAT simple config: ULQ activations and weights at `weight_bits` (arq_retrain at 8 bits, ulq_retrain, a
    learned scale, below), except `int8_layers`, which keep INT8 arq_retrain weights."""
    algo = "arq_retrain" if weight_bits == 8 else "ulq_retrain"
    text = f"batch_num: {batch_num}\nretrain_weight_quant_config {{ {algo} {{ dst_type: INT{weight_bits} }} }}\n"
    return text + "".join(f'override_layer_configs {{ layer_name: "{name}" retrain_weight_quant_config '
                          f'{{ arq_retrain {{ dst_type: INT8 }} }} }}\n' for name in int8_layers)


def _retrain_changes(entry) -> dict:
    changes = {}
    if entry.HasField("retrain_data_quant_config") and entry.retrain_data_quant_config.HasField("ulq_quantize"):
        m = entry.retrain_data_quant_config.ulq_quantize
        clip = (round(m.clip_max_min.clip_max, 6), round(m.clip_max_min.clip_min, 6)) \
            if m.HasField("clip_max_min") else (None, None)
        changes["data"] = RetrainDataParams(clip_max=clip[0], clip_min=clip[1],
                                            fixed_min=m.fixed_min if m.HasField("fixed_min") else None,
                                            dst_type=retrain_pb2.DataType.Name(m.dst_type))
    if entry.HasField("retrain_weight_quant_config"):
        config = entry.retrain_weight_quant_config
        algo = config.WhichOneof("quant_algo")
        if algo:
            m = getattr(config, algo)
            changes["weight"] = RetrainWeightParams(algo=algo, channel_wise=m.channel_wise,
                                                    dst_type=retrain_pb2.DataType.Name(m.dst_type))
    return changes


def retrain_config_from_cfg(path: str, layer_types: dict) -> RetrainConfig:
    """Build the QAT per-layer config from a `retrain_config_pytorch.proto` simple config; priority
    layer > type > global; skip_* and quant_skip_* both skip."""
    message, at = _checked_cfg(path, retrain_pb2.AMCTRetrainConfig, layer_types)
    at("quant_skip_layers", lambda: check_names(message.quant_skip_layers, layer_types, "quant_skip_layers entry"))
    common = at("retrain_", lambda: _retrain_changes(message))
    rules = [Rule(**common)] if common else []
    for entry in message.override_layer_types:
        rules.append(Rule(types=entry.layer_type, **at(entry.layer_type, _retrain_changes, entry)))
    for entry in message.override_layer_configs:
        rules.append(Rule(entry.layer_name, **at(entry.layer_name, _retrain_changes, entry)))
    skip_layers = set(message.skip_layers) | set(message.quant_skip_layers)
    skip_types = set(message.skip_layer_types) | set(message.quant_skip_types)
    skipped = [name for name, types in layer_types.items() if name in skip_layers or skip_types & set(types)]
    if skipped:
        rules.append(Rule(tuple(skipped), retrain_enable=False))
    layers = apply_rules(RetrainLayerConfig(), rules, layer_types, {})
    return at("batch_num", lambda: RetrainConfig(layers=layers, batch_num=message.batch_num))
