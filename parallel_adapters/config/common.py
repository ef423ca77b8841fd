"""What the adapter configs share: target-module types, PEFT's pattern rule, the scale, and
validation helpers that name the field."""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Union

MEGATRON_LINEAR_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
TargetModules = Union[list, tuple, str, None]


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
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ValueError(f"{owner}.{name} must be in [0, 1), got {value!r}")
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
