"""IA3Config, LoHaConfig, LoKrConfig: PEFT's fields for the rest of the adapter family."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Union

from parallel_adapters.config.common import (
    MEGATRON_LINEAR_TARGETS, TargetModules, _canonical_targets, _check_lycoris, _check_targets, _jsonable_targets, _known_fields,
)


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
    Hadamard product of two rank-r products (linear layers and nn.Conv2d)."""

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    """Probability that a row of dW is zeroed in a training forward; the kept rows are divided by
    their mean (PEFT's).  Drawn once over all rows, identically on every TP rank."""
    module_dropout: float = 0.0
    """Probability that the adapter sits out a training forward (one draw shared by the TP ranks)."""
    target_modules: TargetModules = MEGATRON_LINEAR_TARGETS
    exclude_modules: TargetModules = None
    layers_to_transform: Union[int, list, None] = None
    layers_pattern: Union[str, list, None] = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    init_weights: bool = True
    """True: w1a, w1b, w2a Kaiming-uniform, w2b zero (dW = 0).  False: all four Kaiming-uniform."""
    use_effective_conv2d: bool = False
    """Conv2d with a kernel other than 1x1: PEFT's Tucker form (hada_t1/hada_t2); linear layers ignore it."""
    modules_to_save: Union[list, None] = None
    seed: int = 0
    """Seed of the full-tensor initialisation, so every TP size starts from the same adapter."""

    bias = "none"  # not a field: PEFT's LoHaConfig has none

    def __post_init__(self) -> None:
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"LoHaConfig.init_weights must be True or False, got {self.init_weights!r}")
        if not isinstance(self.use_effective_conv2d, bool):
            raise ValueError(f"LoHaConfig.use_effective_conv2d must be True or False, got {self.use_effective_conv2d!r}")
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
    r is under half its larger side (w1 only with `decompose_both`).  Linear layers and nn.Conv2d."""

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0  # as LoHaConfig, the kept rows divided by their mean only with rank_dropout_scale
    module_dropout: float = 0.0  # as LoHaConfig
    use_effective_conv2d: bool = False
    """Conv2d with a kernel other than 1x1 and w2 a product: PEFT's Tucker form (lokr_t2)."""
    decompose_both: bool = False
    """Also write w1 as a rank-r product (when r is under half its larger side)."""
    decompose_factor: int = -1
    """PEFT's `factorization` divider: -1 picks factors near the square root."""
    rank_dropout_scale: bool = False
    """Divide rank dropout's kept rows by their mean (PEFT's LoKr: off by default)."""
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
        if not isinstance(self.use_effective_conv2d, bool):
            raise ValueError(f"LoKrConfig.use_effective_conv2d must be True or False, got {self.use_effective_conv2d!r}")
        if not isinstance(self.rank_dropout_scale, bool):
            raise ValueError(f"LoKrConfig.rank_dropout_scale must be True or False, got {self.rank_dropout_scale!r}")
        _check_lycoris(self)

    to_dict = LoHaConfig.to_dict

    @classmethod
    def from_dict(cls, data: dict) -> "LoKrConfig":
        return cls(**_known_fields(cls, data))
