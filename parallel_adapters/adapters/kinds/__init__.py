"""Adapter kinds, registered by name (docs/design.md section 4b).

A kind is an `AdapterKind` instance (`kinds/protocol.py`).  The built-in kinds register
themselves when their module is imported, which the first lookup does; `register_kind` adds
another kind from anywhere.  `get_adapter_model` picks the kind whose `config_class` the config
is an instance of (and that `accepts` it: LoRA and DoRA share LoraConfig, `use_dora` picks).
"""
from __future__ import annotations

import importlib
from typing import Any, Mapping

from parallel_adapters.adapters.kinds.protocol import SLOTS, AdapterKind

_BUILTIN_MODULES = ("parallel_adapters.adapters.kinds.lora", "parallel_adapters.adapters.kinds.dora",
                    "parallel_adapters.adapters.kinds.ia3", "parallel_adapters.adapters.kinds.loha",
                    "parallel_adapters.adapters.kinds.lokr", "parallel_adapters.adapters.kinds.conv")
_REGISTRY: dict[str, AdapterKind] = {}
_VARIANTS: dict[str, list[AdapterKind]] = {}


def register_kind(kind: AdapterKind, *, replace: bool = False) -> AdapterKind:
    """Register `kind` under `kind.name`; ValueError if the name is taken (unless `replace`) or
    the kind declares a slot that does not exist.  Returns the kind."""
    _load_builtins()
    if not isinstance(kind, AdapterKind) or not kind.name:
        raise ValueError(f"register_kind: expected a named AdapterKind instance, got {kind!r}")
    unknown = sorted({s for slots in kind.slot_table.values() for s in slots} - set(SLOTS))
    if unknown:
        raise ValueError(f"adapter kind {kind.name!r} fills unknown slot(s) {unknown}; slots are {list(SLOTS)}")
    if kind.name in _REGISTRY and not replace and _REGISTRY[kind.name] is not kind:
        raise ValueError(f"an adapter kind named {kind.name!r} is already registered")
    _REGISTRY[kind.name] = kind
    return kind


def register_variant(variant: AdapterKind) -> AdapterKind:
    """Register `variant` as a per-module form of the kind of its name (a subclass of it; its
    `accepts_module` says which modules it takes).  Returns the variant."""
    if not isinstance(variant, AdapterKind) or not variant.name:  # its kind may still be registering
        raise ValueError(f"register_variant: expected a named AdapterKind instance, got {variant!r}")
    unknown = sorted({s for slots in variant.slot_table.values() for s in slots} - set(SLOTS))
    if unknown:
        raise ValueError(f"adapter kind variant {type(variant).__name__} fills unknown slot(s) {unknown}")
    if all(v is not variant for v in _VARIANTS.setdefault(variant.name, [])):
        _VARIANTS[variant.name].append(variant)
    return variant


def kind_for_module(kind: AdapterKind, config: Any, geometry: Any) -> AdapterKind:
    """The form of `kind` for one module: the first variant that accepts it, else `kind` itself."""
    _load_builtins()
    return next((v for v in _VARIANTS.get(kind.name, ()) if v.accepts_module(config, geometry)), kind)


def get_kind(name: str) -> AdapterKind:
    _load_builtins()
    if name not in _REGISTRY:
        raise ValueError(f"unknown adapter kind {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def kind_names() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def kind_for_config(config: Any) -> AdapterKind:
    """The registered kind that accepts `config` (its config class, and e.g. `use_dora`)."""
    _load_builtins()
    for kind in _REGISTRY.values():
        if kind.accepts(config):
            return kind
    wanted = " or ".join(sorted({f"parallel_adapters.{k.config_class.__name__}" for k in _REGISTRY.values()}))
    raise ValueError(f"config must be a {wanted}, got {type(config).__name__}")


def kind_for_stored_config(config: Mapping[str, Any]) -> AdapterKind:
    """The kind of a stored adapter config: a checkpoint's (`adapter_kind`; checkpoints written
    before kinds existed are LoRA) or a PEFT adapter_config.json's (`peft_type`)."""
    _load_builtins()
    if "adapter_kind" in config:
        return get_kind(config["adapter_kind"])
    peft_type = config.get("peft_type", "LORA")
    for kind in _REGISTRY.values():
        if kind.peft_type == peft_type and kind.accepts_stored(config):
            return kind
    raise ValueError(f"no registered adapter kind exports peft_type {peft_type!r}; "
                     f"registered: {sorted(k.peft_type for k in _REGISTRY.values())}")


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)  # registers its kind on first import
