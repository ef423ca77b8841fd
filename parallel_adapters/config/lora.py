"""LoraConfig (LoRA and DoRA), EvaConfig and LoftQConfig, PEFT's fields."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Union

from parallel_adapters.config.common import (
    MEGATRON_LINEAR_TARGETS, TargetModules, _check_positive_int, _check_positive_number, _jsonable_targets,
)


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


@dataclass(frozen=True)
class LoftQConfig:
    """LoftQ initialisation settings (PEFT's `LoftQConfig` fields), with init_lora_weights="loftq"."""

    loftq_bits: int = 4
    """Quantisation bits: 2, 4 (NF4) or 8, NormalFloat blocks of 64 (decompose/quantize.py)."""
    loftq_iter: int = 1
    """Alternating iterations (quantise W - L R, then L R = top-r SVD of W - Q)."""

    def __post_init__(self) -> None:
        if self.loftq_bits not in (2, 4, 8):
            raise ValueError(f"LoftQConfig.loftq_bits must be 2, 4 or 8, got {self.loftq_bits!r}")
        _check_positive_int("loftq_iter", self.loftq_iter, "LoftQConfig")


@dataclass(frozen=True)
class CordaConfig:
    """CorDA initialisation settings (PEFT's `CordaConfig` fields; eva/corda.py)."""

    cache_file: Union[str, None] = None
    """Safetensors file(s) of the cropped eigens (S, U, V per layer; one per TP/PP rank): read when
    present, else written."""
    covariance_file: Union[str, None] = None
    """Safetensors file(s) of the input covariances (one per TP/PP rank): read when present, else written."""
    corda_method: str = "ipm"
    """"ipm": the top r singular triplets of W C; "kpm": the last r."""
    verbose: bool = False
    use_float16_for_covariance: bool = False
    """Accumulate the covariance in the input's dtype (else float32)."""
    prune_temporary_fields: bool = True
    """False: each host keeps its covariance as `corda_covariance`."""
    calibration_batches: int = 8
    """Train runs only (not PEFT's): calibration batches drawn from the run's data."""

    def __post_init__(self) -> None:
        if self.corda_method not in ("ipm", "kpm"):
            raise ValueError(f"CordaConfig.corda_method must be 'ipm' or 'kpm', got {self.corda_method!r}")
        _check_positive_int("calibration_batches", self.calibration_batches, "CordaConfig")


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
    PiSSA / OLoRA; computed on the TP shards without gathering W: adapters/decomposition_init.py).
    "loftq": W replaced by its blockwise-quantised-then-dequantised Q, A, B from the SVD of W - Q
    (PEFT's LoftQ, `loftq_config` required; decompose/loftq.py)."""
    bias: str = "none"
    """"none", "all" (train every bias) or "lora_only" (train biases of adapted layers)."""
    modules_to_save: Union[list, None] = None
    """Extra modules (by name suffix) left trainable and saved with the adapter."""
    eva_config: Union[EvaConfig, None] = None
    loftq_config: Union[LoftQConfig, None] = None
    """LoftQ's settings; required with init_lora_weights="loftq" (as PEFT), unused with any other init."""
    corda_config: Union[CordaConfig, None] = None
    """With init_lora_weights="corda" (CordaConfig() when None); ignored with any other init, as PEFT's."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA): a trainable magnitude per output feature,
    y = m / ||W + s B A||_row * (x W^T + s drop(x) A^T B^T) + b, the norm detached (as PEFT)."""
    seed: int = 0
    """Seed of the full-matrix initialisation, so every TP size starts from the same adapter."""
    conv_layout: str = "peft"
    """LoRA's form on nn.Conv2d: "peft" (A a conv with the base's window, B 1x1) or "alf" (ALF's
    Conv2dAdapter: the kernel read as an (O kh) x (I kw) matrix; lora_alpha is ALF's `weight`,
    s = lora_alpha / r; kinds/conv.py).  Not a PEFT field."""
    share_expert_adapters: bool = False
    """Routed MoE experts: False, one adapter per expert (PEFT's target_parameters layout); True,
    ONE adapter per MoE layer and targeted expert linear (linear_fc1, linear_fc2), shared by every
    routed expert of that layer (each EP rank holds a replica; its gradient is also summed over
    EP).  Saved and exported replicated under every expert's name."""

    def __post_init__(self) -> None:
        _check_positive_int("r", self.r)
        if self.conv_layout not in ("peft", "alf"):
            raise ValueError(f"LoraConfig.conv_layout must be 'peft' or 'alf', got {self.conv_layout!r}")
        _check_positive_number("lora_alpha", self.lora_alpha)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"LoraConfig.bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if self.init_lora_weights not in (True, False, "gaussian", "eva") and (
                decomposition_init(self.init_lora_weights) is None):
            raise ValueError(
                "LoraConfig.init_lora_weights must be True, False, 'gaussian', 'eva', 'pissa', "
                f"'pissa_niter_<K>', 'olora', 'loftq' or 'corda', got {self.init_lora_weights!r}"
            )
        if self.init_lora_weights == "loftq" and not isinstance(self.loftq_config, LoftQConfig):
            raise ValueError("LoraConfig.loftq_config (a LoftQConfig) must be given with init_lora_weights='loftq' "
                             f"(as PEFT), got {self.loftq_config!r}")
        if decomposition_init(self.init_lora_weights) is not None and self.eva_config is not None:
            raise ValueError(f"LoraConfig.eva_config is set but init_lora_weights={self.init_lora_weights!r}: "
                             "EVA and a weight decomposition both initialise the factors; drop eva_config")
        if not isinstance(self.use_dora, bool):
            raise ValueError(f"LoraConfig.use_dora must be True or False, got {self.use_dora!r}")
        if self.use_dora and self.conv_layout != "peft":
            raise ValueError("LoraConfig.conv_layout='alf' with use_dora=True is not supported (DoRA's magnitude "
                             "follows PEFT's conv layout)")
        if self.use_dora and self.init_lora_weights == "eva":
            raise ValueError("LoraConfig.use_dora=True with init_lora_weights='eva' is not supported yet "
                             "(EVA initialises LoRA factors only)")
        if self.init_lora_weights == "corda" and self.corda_config is None:
            object.__setattr__(self, "corda_config", CordaConfig())
        if not isinstance(self.share_expert_adapters, bool):
            raise ValueError(f"LoraConfig.share_expert_adapters must be True or False, got {self.share_expert_adapters!r}")
        if self.share_expert_adapters and (self.use_dora or self.init_lora_weights == "eva"
                                           or decomposition_init(self.init_lora_weights) is not None):
            raise ValueError("LoraConfig.share_expert_adapters=True needs an adapter independent of each expert's "
                             f"weight: not use_dora={self.use_dora} / init_lora_weights={self.init_lora_weights!r} "
                             "(DoRA's magnitude, EVA and PiSSA/OLoRA are drawn per expert)")
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
        if isinstance(data.get("loftq_config"), dict):
            data["loftq_config"] = LoftQConfig(**data["loftq_config"])
        if isinstance(data.get("corda_config"), dict):
            data["corda_config"] = CordaConfig(**data["corda_config"])
        return cls(**data)


_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")


def decomposition_init(init_lora_weights: Any) -> tuple[str, int | None] | None:
    """("pissa", None) for "pissa" (exact SVD), ("pissa", K) for "pissa_niter_K" (randomized SVD,
    K subspace iterations), ("olora", None) for "olora", ("loftq", None) for "loftq", ("corda", None) for "corda"
    (needs calibration data: eva/corda.py); None for any other value."""
    if not isinstance(init_lora_weights, str):
        return None
    if init_lora_weights in ("pissa", "olora", "loftq", "corda"):
        return init_lora_weights, None
    match = _PISSA_NITER.fullmatch(init_lora_weights)
    return ("pissa", int(match.group(1))) if match else None
