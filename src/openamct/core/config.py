"""What to quantize and how: typed, validated dataclasses (PTQ and QAT) and ordered per-layer rules.

The core's configuration only; AMCT's file forms (per-layer JSON, `.cfg`) are read and written in amct/config_files.py,
which translates them into these. A config holds one entry per quantizable layer name; `apply_rules` builds those
entries from rules that select layers by exact name, glob or regex, module type or layer group, later rules winning.
"""
import dataclasses
import difflib
import fnmatch
import re
from dataclasses import dataclass, field

ACT_ALGOS = ("ifmr", "hfmg")
WTS_ALGOS = ("arq_quantize", "nuq_quantize")
CODEBOOKS = ("layer", "channel", "auto")
ROUNDINGS = ("nearest", "gptq", "adaround")
HFMG_BINS = (1024, 2048, 4096, 8192)
NUQ_TYPES = ("Conv2d", "Linear")
LAYER_GROUPS = ("first", "depthwise")  # capture.layer_groups: the stem conv, the depthwise convs


class ConfigError(ValueError):
    """A config file or argument that cannot be used; the message says where."""


class InputError(ValueError):
    """A model or calibration data that cannot be quantized as given (non-finite weights or activations, ...); the
    message names the layer and what to try."""


def check(ok: bool, name: str, value, expected: str) -> None:
    if not ok:
        raise ConfigError(f"field '{name}': got {value!r}, expected {expected}")


_KINDS = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}


def check_types(obj, prefix: str) -> None:
    """Each field of the dataclass `obj` holds a value of its declared type (a bool is not an int here, a string
    is not a bool): a config file's "false" or "8" must not pass as true or 8."""
    for f in dataclasses.fields(obj):
        value, kind = getattr(obj, f.name), f.type
        if getattr(kind, "__origin__", None) is tuple:  # tuple[float, float]
            size = len(kind.__args__)
            ok = isinstance(value, tuple) and len(value) == size and all(_is(v, float) for v in value)
            check(ok, f"{prefix}.{f.name}", value, f"a list of {size} numbers")
            continue
        kinds = [k for k in getattr(kind, "__args__", (kind,)) if k is not type(None)]  # X | None
        if value is None and len(kinds) < len(getattr(kind, "__args__", ())):
            continue
        if kinds[0] in _KINDS:
            check(_is(value, kinds[0]), f"{prefix}.{f.name}", value, _KINDS[kinds[0]])


def _is(value, kind) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    numbers = (int, float) if kind is float else (kind,)
    return isinstance(value, numbers) and not isinstance(value, bool)


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
        check_types(self, "activation_quant_params")
        check(self.num_bits in (4, 8), "activation_quant_params.num_bits", self.num_bits, "4 or 8")
        check(self.act_algo in ACT_ALGOS, "activation_quant_params.act_algo", self.act_algo, " or ".join(ACT_ALGOS))
        for name in ("max_percentile", "min_percentile"):
            value = getattr(self, name)
            check(0.5 < value <= 1.0, f"activation_quant_params.{name}", value, "a value in (0.5, 1]")
        start, end = self.search_range
        check(0 < start < end, "activation_quant_params.search_range", list(self.search_range), "0 < start < end")
        check(0 < self.search_step <= end - start, "activation_quant_params.search_step", self.search_step,
              "0 < step <= end - start")
        check(self.num_of_bins in HFMG_BINS, "activation_quant_params.num_of_bins", self.num_of_bins,
              " or ".join(map(str, HFMG_BINS)))


@dataclass(frozen=True)
class WeightQuantParams:
    num_bits: int = 8
    wts_algo: str = "arq_quantize"
    channel_wise: bool = True
    num_steps: int = 32           # nuq_quantize: levels per codebook
    num_of_iteration: int = 4     # nuq_quantize: rounds of level refits alternating with GPTQ (algorithms/nuq.py)
    codebook: str = "auto"        # nuq_quantize: one codebook per "layer", per output "channel", or "auto"
    rounding: str = "gptq"        # "nearest"; "gptq" or "adaround": weights chosen to minimise the output error
    bias_correction: bool = True  # correct the output-mean shift that weight quantization leaves
    num_iteration: int = 10000    # adaround (AMCT's ada_quantize): Adam steps per layer
    reg_param: float = 0.01       # adaround: weight of the regulariser that drives each rounding to up or down
    beta_range: tuple[float, float] = (20.0, 2.0)  # adaround: the regulariser's beta, annealed from start to end
    warm_start: float = 0.2       # adaround: share of the iterations before the regulariser starts

    def __post_init__(self):
        check_types(self, "weight_quant_params")
        check(self.num_bits in (4, 6, 7, 8), "weight_quant_params.num_bits", self.num_bits, "4, 6, 7 or 8")
        check(self.wts_algo in WTS_ALGOS, "weight_quant_params.wts_algo", self.wts_algo, " or ".join(WTS_ALGOS))
        if self.nuq:
            most = min(256, 2 ** self.num_bits - 1)
            check(isinstance(self.num_steps, int) and 2 <= self.num_steps <= most, "weight_quant_params.num_steps",
                  self.num_steps, f"an integer in 2..{most} (fewer levels than the INT{self.num_bits} grid)")
            check(isinstance(self.num_of_iteration, int) and self.num_of_iteration >= 0,
                  "weight_quant_params.num_of_iteration", self.num_of_iteration, "an integer >= 0")
            check(self.codebook in CODEBOOKS, "weight_quant_params.codebook", self.codebook, " or ".join(CODEBOOKS))
        check(self.rounding in ROUNDINGS, "weight_quant_params.rounding", self.rounding, " or ".join(ROUNDINGS))
        if self.rounding == "adaround":
            check(not self.nuq, "weight_quant_params.rounding", self.rounding,
                  "nearest or gptq with nuq_quantize (AdaRound on NUQ codebooks is not available yet)")
            check(self.num_iteration >= 1, "weight_quant_params.num_iteration", self.num_iteration, "an integer >= 1")
            check(self.reg_param >= 0, "weight_quant_params.reg_param", self.reg_param, "a number >= 0")
            start, end = self.beta_range
            check(start >= end > 0, "weight_quant_params.beta_range", list(self.beta_range),
                  "[start, end] with start >= end > 0")
            check(0 <= self.warm_start < 1, "weight_quant_params.warm_start", self.warm_start, "a value in [0, 1)")

    @property
    def nuq(self) -> bool:
        return self.wts_algo == "nuq_quantize"


def check_migration_strength(value, name: str) -> None:
    """DMQ's migration strength: the share of each input channel's range moved from the activations into the
    weights (algorithms/dmq.py), 0 (none) to 1 (all)."""
    check(value is None or (_is(value, float) and 0 <= value <= 1), name, value, "a number in [0, 1]")


@dataclass(frozen=True)
class LayerConfig:
    """`dmq_balancer_param`: the DMQ migration strength, None for no balancing. It is applied by the AMCT flow's
    quantize_preprocess pre-pass (amct/preprocess.py), which needs its own calibration batches."""
    quant_enable: bool = True
    activation: ActQuantParams = field(default_factory=ActQuantParams)
    weight: WeightQuantParams = field(default_factory=WeightQuantParams)
    dmq_balancer_param: float | None = None

    def __post_init__(self):
        check_migration_strength(self.dmq_balancer_param, "dmq_balancer_param")


@dataclass(frozen=True)
class ReconstructionParams:
    """Block reconstruction (an openamct extension, core/reconstruction.py): after calibration, each block's output
    matched to the float model's over its layers' roundings and its activations' step sizes."""
    blocks: tuple = ()            # module names of the blocks, in any order; () = the automatic rule
    num_iteration: int = 300      # Adam steps per block (fewer where every rounding has settled)
    batch_size: int = 16          # cached calibration samples per step
    drop_prob: float = 0.5        # QDrop: share of activation values left unquantized in each step
    reg_param: float = 0.01       # as AdaRound's: weight of the regulariser that drives each rounding to up or down
    beta_range: tuple[float, float] = (20.0, 2.0)
    warm_start: float = 0.2
    seed: int = 0                 # the samples and QDrop masks drawn: a seed makes runs repeatable

    def __post_init__(self):
        check(isinstance(self.blocks, (tuple, list)) and all(isinstance(b, str) and b for b in self.blocks),
              "block_reconstruction.blocks", self.blocks, "a list of module names")
        object.__setattr__(self, "blocks", tuple(self.blocks))
        check_types(self, "block_reconstruction")
        check(self.num_iteration >= 1, "block_reconstruction.num_iteration", self.num_iteration, "an integer >= 1")
        check(self.batch_size >= 1, "block_reconstruction.batch_size", self.batch_size, "an integer >= 1")
        check(0 <= self.drop_prob < 1, "block_reconstruction.drop_prob", self.drop_prob, "a value in [0, 1)")
        check(self.reg_param >= 0, "block_reconstruction.reg_param", self.reg_param, "a number >= 0")
        start, end = self.beta_range
        check(start >= end > 0, "block_reconstruction.beta_range", list(self.beta_range),
              "[start, end] with start >= end > 0")
        check(0 <= self.warm_start < 1, "block_reconstruction.warm_start", self.warm_start, "a value in [0, 1)")


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how: global options plus one LayerConfig per quantizable layer name;
    `reconstruction` (None: off) reconstructs blocks after calibration."""
    layers: dict = field(default_factory=dict)
    batch_num: int = 1
    activation_offset: bool = True
    do_fusion: bool = True
    skip_fusion_layers: tuple = ()
    reconstruction: ReconstructionParams | None = None

    def __post_init__(self):
        check(isinstance(self.batch_num, int) and self.batch_num > 0, "batch_num", self.batch_num, "an integer > 0")

    def asymmetric(self, name: str) -> bool:
        act = self.layers[name].activation
        return self.activation_offset if act.asymmetric is None else act.asymmetric

    def enabled(self) -> list[str]:
        return [name for name, layer in self.layers.items() if layer.quant_enable]


def check_names(names, known, what: str) -> None:
    """Raise for names that are not layers of the model, listing near matches."""
    for name in names:
        if name not in known:
            near = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ""
            raise ConfigError(f"{what} '{name}' is not a quantizable layer of the model{hint}")


def check_nuq_types(layers: dict, layer_types: dict) -> None:
    """NUQ codebooks are fitted and exported for Conv2d and Linear weights only."""
    for name, layer in layers.items():
        if layer.weight.nuq and not set(layer_types[name]) & set(NUQ_TYPES):
            raise ConfigError(f"layer '{name}' ({layer_types[name][0]}) cannot take nuq_quantize: only "
                              f"{' and '.join(NUQ_TYPES)} layers can")


# ---------------------------------------------------------------- rules

def _as_tuple(value) -> tuple:
    return () if value is None else (value,) if isinstance(value, str) else tuple(value)


class Rule:
    """Settings for the layers it selects. Selectors (all given ones must match; none: every layer):

    - `layers`: names, each exact, a glob (`"_blocks.*._expand_conv"`) or a regex (`"re:layer[12]\\..*"`);
    - `types`: module type names (`"Conv2d"`, `"Linear"`; a subclass matches its torch.nn base too);
    - `group`: layer groups, "first" (the layer the input reaches first) and "depthwise".

    `changes` are fields of the layer's config: a whole value (`weight=WeightQuantParams(num_bits=4)`) replaces the
    field, a dict (`weight={"num_bits": 4}`) changes only the keys it names.

        Rule(weight={"num_bits": 4})                                  # every layer
        Rule(group=("first", "depthwise"), weight={"num_bits": 8})    # ... but these stay INT8
        Rule("classifier.*", quant_enable=False)
    """

    def __init__(self, layers=None, *, types=None, group=None, **changes):
        self.layers, self.types, self.group = _as_tuple(layers), _as_tuple(types), _as_tuple(group)
        unknown = sorted(set(self.group) - set(LAYER_GROUPS))
        if unknown:
            raise ConfigError(f"rule group {unknown[0]!r}: expected one of {', '.join(LAYER_GROUPS)}")
        for pattern in self.layers:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as e:
                    raise ConfigError(f"rule layers {pattern!r}: invalid regular expression: {e}") from None
        self.changes = changes

    def __repr__(self):
        parts = [f"{key}={value!r}" for key, value in (("layers", self.layers), ("types", self.types),
                                                        ("group", self.group)) if value]
        return f"Rule({', '.join(parts + [f'{k}={v!r}' for k, v in self.changes.items()])})"

    def selects(self, name: str, types: tuple, groups: set) -> bool:
        return (not self.layers or any(_name_matches(p, name) for p in self.layers)) and \
            (not self.types or bool(set(self.types) & set(types))) and \
            (not self.group or bool(set(self.group) & groups))

    def apply(self, layer):
        """`layer` (a LayerConfig or RetrainLayerConfig) with this rule's changes."""
        names = {f.name for f in dataclasses.fields(layer)}
        changes = {}
        for key, value in self.changes.items():
            check(key in names, f"rule {key}", value, "one of " + ", ".join(sorted(names)))
            if isinstance(value, dict):
                current = getattr(layer, key)
                fields = {f.name for f in dataclasses.fields(current)}
                for sub in value:
                    check(sub in fields, f"{key}.{sub}", value[sub], "one of " + ", ".join(sorted(fields)))
                value = dataclasses.replace(current, **value)
            changes[key] = value
        return dataclasses.replace(layer, **changes)


def _name_matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern == name


def apply_rules(base, rules, layer_types: dict, groups: dict) -> dict:
    """Layer name -> `base` changed by every rule that selects the layer, in order (later rules win).

    `layer_types`: name -> type names (capture order); `groups`: group name -> set of layer names. A rule that
    selects no layer is an error: it is a typo or a rule for another model."""
    in_groups = {name: {g for g, members in groups.items() if name in members} for name in layer_types}
    layers = dict.fromkeys(layer_types, base)
    for index, rule in enumerate(rules):
        selected = [name for name, types in layer_types.items() if rule.selects(name, types, in_groups[name])]
        if not selected:
            exact = [p for p in rule.layers if not p.startswith("re:") and not any(c in p for c in "*?[")]
            check_names(exact, layer_types, f"rule {index} ({rule!r}): layer")
            raise ConfigError(f"rule {index} ({rule!r}) selects no layer of the model")
        for name in selected:
            layers[name] = rule.apply(layers[name])
    return layers


def stem_depthwise_int8() -> Rule:
    """The named preset for low-bit weights: the stem conv and the depthwise convs keep INT8 weights. They hold
    few weights (so little size is saved) and lose the most at 4 bits."""
    return Rule(group=("first", "depthwise"), weight={"num_bits": 8})


# ---------------------------------------------------------------- QAT (retrain)

DST_BITS = {"INT4": 4, "INT8": 8}
RETRAIN_WTS_ALGOS = ("arq_retrain", "ulq_retrain")


def _dst_bits(dst_type: str, name: str) -> int:
    check(dst_type in DST_BITS, name, dst_type, " or ".join(DST_BITS))
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
        check_types(self, "retrain_data_config")
        check(self.algo == "ulq_quantize", "retrain_data_config.algo", self.algo, "ulq_quantize")
        _dst_bits(self.dst_type, "retrain_data_config.dst_type")
        check((self.clip_max is None) == (self.clip_min is None), "retrain_data_config.clip_max/clip_min",
              [self.clip_max, self.clip_min], "both or neither")
        if self.clip_max is not None:
            check(self.clip_max > 0, "retrain_data_config.clip_max", self.clip_max, "a value > 0")
            check(self.clip_min < 0 or (self.clip_min == 0 and self.fixed_min is not False),
                  "retrain_data_config.clip_min", self.clip_min, "a value < 0 (or 0 with fixed_min)")

    @property
    def num_bits(self) -> int:
        return DST_BITS[self.dst_type]


@dataclass(frozen=True)
class RetrainWeightParams:
    """arq_retrain: symmetric range recomputed from the weights at every step; ulq_retrain: a learned scale."""
    algo: str = "arq_retrain"
    channel_wise: bool = True
    dst_type: str = "INT8"

    def __post_init__(self):
        check_types(self, "retrain_weight_config")
        check(self.algo in RETRAIN_WTS_ALGOS, "retrain_weight_config.algo", self.algo, " or ".join(RETRAIN_WTS_ALGOS))
        _dst_bits(self.dst_type, "retrain_weight_config.dst_type")

    @property
    def num_bits(self) -> int:
        return DST_BITS[self.dst_type]


@dataclass(frozen=True)
class RetrainLayerConfig:
    retrain_enable: bool = True
    data: RetrainDataParams = field(default_factory=RetrainDataParams)
    weight: RetrainWeightParams = field(default_factory=RetrainWeightParams)

    def quant(self) -> LayerConfig:
        """The PTQ view of this layer (bits, channel_wise; plain rounding): what the exported model holds."""
        weight = WeightQuantParams(num_bits=self.weight.num_bits, channel_wise=self.weight.channel_wise,
                                   rounding="nearest", bias_correction=False)
        return LayerConfig(quant_enable=self.retrain_enable, activation=ActQuantParams(num_bits=self.data.num_bits),
                           weight=weight)


@dataclass(frozen=True)
class RetrainConfig:
    """What to train quantized and how: `batch_num` (batches of IFMR initialisation) and one entry per layer."""
    layers: dict = field(default_factory=dict)
    batch_num: int = 1

    def __post_init__(self):
        check(isinstance(self.batch_num, int) and self.batch_num > 0, "batch_num", self.batch_num, "an integer > 0")

    def quant_config(self) -> QuantConfig:
        return QuantConfig(layers={name: layer.quant() for name, layer in self.layers.items()},
                           batch_num=self.batch_num)
