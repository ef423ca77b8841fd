"""Typed adapter configuration, in PEFT's vocabulary (`LoraConfig`, `EvaConfig`, `IA3Config`, `LoHaConfig`,
`LoKrConfig`).

Field names and defaults follow Hugging Face PEFT so that a PEFT user is at home and so that
`adapter_config.json` round-trips.  Validation raises ValueError naming the field.  Configs are
never mutated after construction by this package: helpers return modified copies.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Union

MEGATRON_LINEAR_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


@dataclass(frozen=True)
class EvaConfig:
    """Explained Variance Adaptation (EVA) initialisation settings (PEFT's `EvaConfig` fields)."""

    rho: float = 2.0
    """Max rank of a layer after redistribution, as a multiple of its r (1.0 = no redistribution)."""
    tau: float = 0.99
    """Cosine-similarity threshold between successive steps at which a layer's components converge."""
    use_label_mask: bool = True
    """Drop tokens whose label equals `label_mask_value` from the statistics."""
    label_mask_value: int = -100
    whiten: bool = False
    """Scale A by the inverse singular values."""
    adjust_scaling_factors: bool = True
    """Rescale lora_alpha so that alpha / r stays as configured when a layer's rank changes."""
    max_steps: int = 100
    """Cap on EVA batches; layers still unconverged then are reported in a warning."""
    sketch_multiple: float = 2.0
    """Components each data-parallel rank keeps and exchanges, as a multiple of round(r * rho)."""

    def __post_init__(self) -> None:
        if self.rho < 1.0:
            raise ValueError(f"EvaConfig.rho must be >= 1.0, got {self.rho}")
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"EvaConfig.tau must be in (0, 1], got {self.tau}")
        if self.max_steps < 1:
            raise ValueError(f"EvaConfig.max_steps must be >= 1, got {self.max_steps}")
        if self.sketch_multiple < 1.0:
            raise ValueError(f"EvaConfig.sketch_multiple must be >= 1.0, got {self.sketch_multiple}")


TargetModules = Union[list, tuple, str, None]


@dataclass(frozen=True)
class LoraConfig:
    """LoRA settings, field for field PEFT's `LoraConfig` where the concept is the same."""

    r: int = 8
    """Adapter rank."""
    lora_alpha: float = 8
    """Scaling numerator: scale = lora_alpha / r (or / sqrt(r) with use_rslora)."""
    lora_dropout: float = 0.0
    """Dropout probability on the adapter input."""
    target_modules: TargetModules = MEGATRON_LINEAR_TARGETS
    """Module names (exact or '.'-suffix match), a regex (full match), or "all-linear"."""
    exclude_modules: TargetModules = None
    """Like target_modules; matching modules are never adapted."""
    layers_to_transform: Union[int, list, None] = None
    """Only adapt these (global) transformer layer indices."""
    layers_pattern: Union[str, list, None] = None
    """Name of the ModuleList holding the layers (Megatron: "layers")."""
    rank_pattern: dict = field(default_factory=dict)
    """Regex (suffix match on the module name) -> rank, overriding r."""
    alpha_pattern: dict = field(default_factory=dict)
    """Regex (suffix match on the module name) -> alpha, overriding lora_alpha."""
    use_rslora: bool = False
    """Rank-stabilised scaling: lora_alpha / sqrt(r)."""
    init_lora_weights: Union[bool, str] = True
    """True: A Kaiming-uniform, B zero.  "gaussian": A ~ N(0, 1/r), B zero.  False: both random.
    "eva": data-driven A (see EvaConfig), B zero.  "pissa": A, B from the top-r singular triplets
    of W, W replaced by the residual W - s B A; "pissa_niter_K": the same from a randomized SVD
    with K subspace iterations; "olora": A, B from a QR of W, W replaced by W - s B A (PEFT's
    PiSSA / OLoRA; computed on the TP shards without gathering W: adapters/decomposition_init.py)."""
    bias: str = "none"
    """"none", "all" (train every bias) or "lora_only" (train biases of adapted layers)."""
    modules_to_save: Union[list, None] = None
    """Extra modules (by name suffix) left trainable and saved with the adapter."""
    eva_config: Union[EvaConfig, None] = None
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA): a trainable magnitude per output feature,
    y = m / ||W + s B A||_row * (x W^T + s drop(x) A^T B^T) + b, the norm detached (as PEFT)."""
    seed: int = 0
    """Seed of the full-matrix initialisation, so every TP size starts from the same adapter."""

    def __post_init__(self) -> None:
        _check_positive_int("r", self.r)
        _check_positive_number("lora_alpha", self.lora_alpha)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"LoraConfig.bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if self.init_lora_weights not in (True, False, "gaussian", "eva") and (
                decomposition_init(self.init_lora_weights) is None):
            raise ValueError(
                "LoraConfig.init_lora_weights must be True, False, 'gaussian', 'eva', 'pissa', "
                f"'pissa_niter_<K>' or 'olora', got {self.init_lora_weights!r}"
            )
        if decomposition_init(self.init_lora_weights) is not None and self.eva_config is not None:
            raise ValueError(f"LoraConfig.eva_config is set but init_lora_weights={self.init_lora_weights!r}: "
                             "EVA and a weight decomposition both initialise the factors; drop eva_config")
        if not isinstance(self.use_dora, bool):
            raise ValueError(f"LoraConfig.use_dora must be True or False, got {self.use_dora!r}")
        if self.use_dora and self.init_lora_weights == "eva":
            raise ValueError("LoraConfig.use_dora=True with init_lora_weights='eva' is not supported yet "
                             "(EVA initialises LoRA factors only)")
        if self.init_lora_weights == "eva" and self.eva_config is None:
            object.__setattr__(self, "eva_config", EvaConfig())
        if self.target_modules is None or (isinstance(self.target_modules, (list, tuple)) and not self.target_modules):
            raise ValueError("LoraConfig.target_modules must name at least one module")
        for key, value in self.rank_pattern.items():
            _check_positive_int(f"rank_pattern[{key!r}]", value)
        for key, value in self.alpha_pattern.items():
            _check_positive_number(f"alpha_pattern[{key!r}]", value)
        if isinstance(self.layers_to_transform, int):
            object.__setattr__(self, "layers_to_transform", (self.layers_to_transform,))
        for name in ("target_modules", "exclude_modules", "layers_to_transform", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, list):  # one canonical form, so equal configs compare equal
                object.__setattr__(self, name, tuple(value))

    def replace(self, **changes: Any) -> "LoraConfig":
        """A validated copy with some fields changed (configs are immutable)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        for name in ("target_modules", "exclude_modules", "layers_to_transform", "modules_to_save"):
            data[name] = _jsonable_targets(data[name])
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "LoraConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"LoraConfig: unknown field(s) {unknown}")
        data = dict(data)
        if isinstance(data.get("eva_config"), dict):
            data["eva_config"] = EvaConfig(**data["eva_config"])
        return cls(**data)


IA3_FUSED_PARTS = {"linear_qkv": ("q", "k", "v"), "linear_fc1": ("gate", "up")}
"""Megatron's fused linears and the HF modules (parts) their rows hold, as IA3Config.fused_parts names them."""


@dataclass(frozen=True)
class IA3Config:
    """(IA)^3 settings, PEFT's `IA3Config` fields: a learned vector scales a targeted module's
    output, or its input where the module is a feedforward module.

    Megatron fuses q/k/v into `linear_qkv` and SwiGLU's gate/up into `linear_fc1`; PEFT scales
    HF modules one by one (its Llama default: k_proj, v_proj, and down_proj on the input).
    `fused_parts` says which parts of a fused module's OUTPUT rows are scaled: the vector holds
    those rows only; the other rows keep scale 1 and train nothing."""

    target_modules: TargetModules = ("linear_qkv", "linear_fc2")
    """As LoraConfig.target_modules (Megatron names; default: PEFT's Llama default k, v, down)."""
    feedforward_modules: TargetModules = ("linear_fc2",)
    """Targeted modules whose INPUT is scaled (list: name or '.'-suffix match; str: full regex)."""
    exclude_modules: TargetModules = None
    fused_parts: dict = field(default_factory=lambda: {"linear_qkv": ("k", "v")})
    """Fused module leaf name -> the parts whose output rows are scaled ("linear_qkv": any of
    "q", "k", "v"; "linear_fc1": "gate", "up"); a fused module not named here: all its rows."""
    init_ia3_weights: bool = True
    """True: ones (the identity).  False: standard normal, as PEFT."""
    fan_in_fan_out: bool = False
    """Only False: Megatron and nn.Linear weights are [out, in]."""
    modules_to_save: Union[list, None] = None
    seed: int = 0
    """Seed of the initialisation (init_ia3_weights=False), so every TP size starts alike."""

    layers_to_transform = None  # not fields: PEFT's IA3Config has neither; find_targets reads them
    layers_pattern = None
    bias = "none"

    def __post_init__(self) -> None:
        _check_targets("IA3Config", self.target_modules)
        if not isinstance(self.init_ia3_weights, bool):
            raise ValueError(f"IA3Config.init_ia3_weights must be True or False, got {self.init_ia3_weights!r}")
        if self.fan_in_fan_out:
            raise ValueError("IA3Config.fan_in_fan_out=True is not supported: Megatron and nn.Linear weights "
                             "are [out, in] (it is for GPT-2's Conv1D)")
        ff, targets = self.feedforward_modules, self.target_modules
        if isinstance(ff, (list, tuple)) and isinstance(targets, (list, tuple)) and not set(ff) <= set(targets):
            raise ValueError(f"IA3Config.feedforward_modules {sorted(set(ff) - set(targets))} are not in "
                             f"target_modules {list(targets)}")
        parts = {}
        for module, names in self.fused_parts.items():
            if module not in IA3_FUSED_PARTS:
                raise ValueError(f"IA3Config.fused_parts key {module!r}: fused modules are {sorted(IA3_FUSED_PARTS)}")
            names = (names,) if isinstance(names, str) else tuple(names)
            bad = [n for n in names if n not in IA3_FUSED_PARTS[module]]
            if bad or not names or len(set(names)) != len(names):
                raise ValueError(f"IA3Config.fused_parts[{module!r}] = {list(names)}: give distinct parts "
                                 f"among {list(IA3_FUSED_PARTS[module])}")
            parts[module] = tuple(n for n in IA3_FUSED_PARTS[module] if n in names)  # canonical order
        object.__setattr__(self, "fused_parts", parts)
        _canonical_targets(self, ("target_modules", "feedforward_modules", "exclude_modules", "modules_to_save"))

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["fused_parts"] = {k: list(v) for k, v in data["fused_parts"].items()}
        for name in ("target_modules", "feedforward_modules", "exclude_modules", "modules_to_save"):
            data[name] = _jsonable_targets(data[name])
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "IA3Config":
        return cls(**_known_fields(cls, data))


@dataclass(frozen=True)
class LoHaConfig:
    """LoHa settings, PEFT's `LoHaConfig` fields: dW = (alpha / r) (w1a w1b) * (w2a w2b), the
    Hadamard product of two rank-r products (linear layers; no Conv2d here)."""

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    """Only 0: a per-row mask over the whole weight would need the TP ranks' RNG agreed (refused)."""
    module_dropout: float = 0.0
    """Only 0: skipping the adapter per step needs one draw shared by every TP rank (refused)."""
    target_modules: TargetModules = MEGATRON_LINEAR_TARGETS
    exclude_modules: TargetModules = None
    layers_to_transform: Union[int, list, None] = None
    layers_pattern: Union[str, list, None] = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    init_weights: bool = True
    """True: w1a, w1b, w2a Kaiming-uniform, w2b zero (dW = 0).  False: all four Kaiming-uniform."""
    modules_to_save: Union[list, None] = None
    seed: int = 0
    """Seed of the full-tensor initialisation, so every TP size starts from the same adapter."""

    bias = "none"  # not a field: PEFT's LoHaConfig has none

    def __post_init__(self) -> None:
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"LoHaConfig.init_weights must be True or False, got {self.init_weights!r}")
        _check_lycoris(self)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        for name in ("target_modules", "exclude_modules", "layers_to_transform", "modules_to_save"):
            data[name] = _jsonable_targets(data[name])
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "LoHaConfig":
        return cls(**_known_fields(cls, data))


@dataclass(frozen=True)
class LoKrConfig:
    """LoKr settings, PEFT's `LoKrConfig` fields: dW = (alpha / r) (w1 kron w2), out = o1 o2 and
    in = i1 i2 by PEFT's `factorization(dim, decompose_factor)`; a factor is a rank-r product when
    r is under half its larger side (w1 only with `decompose_both`).  Linear layers only."""

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0  # only 0, as LoHaConfig
    module_dropout: float = 0.0  # only 0, as LoHaConfig
    use_effective_conv2d: bool = False  # only False: it shapes Conv2d adapters, and no conv is adapted here
    decompose_both: bool = False
    """Also write w1 as a rank-r product (when r is under half its larger side)."""
    decompose_factor: int = -1
    """PEFT's `factorization` divider: -1 picks factors near the square root."""
    rank_dropout_scale: bool = False  # only False: it scales rank_dropout, which is 0
    target_modules: TargetModules = MEGATRON_LINEAR_TARGETS
    exclude_modules: TargetModules = None
    layers_to_transform: Union[int, list, None] = None
    layers_pattern: Union[str, list, None] = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    init_weights: Union[bool, str] = True
    """True: w1 (or w1_a) zero, the rest Kaiming-uniform; "lycoris": w2 (or w2_b) zero instead;
    False: all random."""
    modules_to_save: Union[list, None] = None
    seed: int = 0
    """Seed of the full-tensor initialisation, so every TP size starts from the same adapter."""

    bias = "none"  # not a field: PEFT's LoKrConfig has none

    def __post_init__(self) -> None:
        if self.init_weights not in (True, False, "lycoris"):
            raise ValueError(f"LoKrConfig.init_weights must be True, False or 'lycoris', got {self.init_weights!r}")
        if isinstance(self.decompose_factor, bool) or not isinstance(self.decompose_factor, int) or (
                self.decompose_factor < 1 and self.decompose_factor != -1):
            raise ValueError(f"LoKrConfig.decompose_factor must be -1 or a positive integer, "
                             f"got {self.decompose_factor!r}")
        if not isinstance(self.decompose_both, bool):
            raise ValueError(f"LoKrConfig.decompose_both must be True or False, got {self.decompose_both!r}")
        for name in ("rank_dropout_scale", "use_effective_conv2d"):  # would be ignored: refused
            if getattr(self, name) is not False:
                raise ValueError(f"LoKrConfig.{name}={getattr(self, name)!r} is not supported (linear layers, "
                                 "rank_dropout 0); use False")
        _check_lycoris(self)

    to_dict = LoHaConfig.to_dict

    @classmethod
    def from_dict(cls, data: dict) -> "LoKrConfig":
        return cls(**_known_fields(cls, data))


_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")


PROMPT_TUNING_INITS = ("RANDOM", "TEXT", "SAMPLE_VOCAB")


@dataclass(frozen=True)
class PromptTuningConfig:
    """Prompt tuning (PEFT's `PromptTuningConfig`): `num_virtual_tokens` trainable embeddings
    prepended to every sequence (adapters/prompt.py)."""

    num_virtual_tokens: int = 20
    prompt_tuning_init: str = "RANDOM"
    """RANDOM (N(0, 1), as nn.Embedding), TEXT (the embeddings of the tokenised init text, cut or
    repeated to num_virtual_tokens) or SAMPLE_VOCAB (embeddings of random vocabulary rows)."""
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None
    init_token_ids: tuple[int, ...] | None = None
    """Not PEFT's: TEXT's tokenised text (interop.hf_tokenizer.prompt_init_token_ids fills it)."""
    token_dim: int | None = None
    num_transformer_submodules: int = 1
    num_attention_heads: int | None = None
    num_layers: int | None = None
    inference_mode: bool = False
    seed: int = 0
    """Seeds RANDOM and SAMPLE_VOCAB (PEFT draws from torch's global generator)."""
    peft_type: str = "PROMPT_TUNING"
    task_type: str = "CAUSAL_LM"

    def __post_init__(self) -> None:
        _check_positive_int("num_virtual_tokens", self.num_virtual_tokens, "PromptTuningConfig")
        if self.prompt_tuning_init not in PROMPT_TUNING_INITS:
            raise ValueError(f"PromptTuningConfig.prompt_tuning_init must be one of {PROMPT_TUNING_INITS}, "
                             f"got {self.prompt_tuning_init!r}")
        if self.prompt_tuning_init == "TEXT" and not self.prompt_tuning_init_text and self.init_token_ids is None:
            raise ValueError("PromptTuningConfig.prompt_tuning_init='TEXT' needs prompt_tuning_init_text")
        if self.num_transformer_submodules != 1 or self.task_type != "CAUSAL_LM":
            raise ValueError("PromptTuningConfig: only task_type='CAUSAL_LM' with num_transformer_submodules=1 "
                             f"(a decoder-only GPT), got {self.task_type!r} / {self.num_transformer_submodules}")
        if self.init_token_ids is not None:
            object.__setattr__(self, "init_token_ids", tuple(int(i) for i in self.init_token_ids))

    def replace(self, **changes: Any) -> "PromptTuningConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["init_token_ids"] = None if self.init_token_ids is None else list(self.init_token_ids)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "PromptTuningConfig":
        return cls(**_known_fields(cls, data))


def decomposition_init(init_lora_weights: Any) -> tuple[str, int | None] | None:
    """("pissa", None) for "pissa" (exact SVD), ("pissa", K) for "pissa_niter_K" (randomized SVD,
    K subspace iterations), ("olora", None) for "olora"; None for any other value."""
    if not isinstance(init_lora_weights, str):
        return None
    if init_lora_weights in ("pissa", "olora"):
        return init_lora_weights, None
    match = _PISSA_NITER.fullmatch(init_lora_weights)
    return ("pissa", int(match.group(1))) if match else None


def pattern_key_matches(key: str, module_name: str) -> bool:
    """PEFT's rank_pattern / alpha_pattern rule: `key` is a regex matching a '.'-suffix of the name."""
    return re.match(rf"(.*\.)?({key})$", module_name) is not None


def pattern_value(module_name: str, pattern: dict, default: Any) -> Any:
    """The value of the first `pattern` key matching `module_name`, else `default`."""
    for key, value in pattern.items():
        if pattern_key_matches(key, module_name):
            return value
    return default


def lora_scaling(lora_alpha: float, r: int, use_rslora: bool) -> float:
    """PEFT's scale: alpha / r, or alpha / sqrt(r) for rsLoRA."""
    return lora_alpha / (math.sqrt(r) if use_rslora else r)


def _jsonable_targets(targets: TargetModules):
    return list(targets) if isinstance(targets, tuple) else targets


def _check_positive_int(name: str, value: Any, owner: str = "LoraConfig") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{owner}.{name} must be a positive integer, got {value!r}")


def _check_positive_number(name: str, value: Any, owner: str = "LoraConfig") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{owner}.{name} must be > 0, got {value!r}")


def _check_targets(owner: str, targets: TargetModules) -> None:
    if targets is None or (isinstance(targets, (list, tuple)) and not targets):
        raise ValueError(f"{owner}.target_modules must name at least one module")


def _canonical_targets(config: Any, names: tuple[str, ...]) -> None:
    """Lists become tuples, so equal configs compare equal."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, list):
            object.__setattr__(config, name, tuple(value))


def _check_lycoris(config: Any) -> None:
    """The checks LoHaConfig and LoKrConfig share (PEFT's LyCORIS fields)."""
    owner = type(config).__name__
    _check_positive_int("r", config.r, owner)
    _check_positive_number("alpha", config.alpha, owner)
    for name in ("rank_dropout", "module_dropout"):
        value = getattr(config, name)
        if value != 0:
            raise ValueError(f"{owner}.{name}={value!r} is not supported under tensor parallelism yet "
                             "(its random mask would have to agree across the TP ranks sharing a factor); use 0")
    _check_targets(owner, config.target_modules)
    for key, value in config.rank_pattern.items():
        _check_positive_int(f"rank_pattern[{key!r}]", value, owner)
    for key, value in config.alpha_pattern.items():
        _check_positive_number(f"alpha_pattern[{key!r}]", value, owner)
    if isinstance(config.layers_to_transform, int):
        object.__setattr__(config, "layers_to_transform", (config.layers_to_transform,))
    _canonical_targets(config, ("target_modules", "exclude_modules", "layers_to_transform", "modules_to_save"))


def _known_fields(cls: type, data: dict) -> dict:
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}")
    return dict(data)
