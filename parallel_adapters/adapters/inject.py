"""Find the modules an adapter config targets, and wrap them in place in their hosts.

Matching follows PEFT: a list entry matches a module whose name equals it or ends with
"." + entry; a string is a regex that must match the whole name; "all-linear" takes every
adaptable linear layer except the output layer.  Layer indices (layers_to_transform) are global
transformer layer indices, so a pipeline stage filters on the layers it actually holds.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from parallel_adapters.adapters import functional as lf
from parallel_adapters.adapters.hosts.base import AdapterHost
from parallel_adapters.adapters.hosts.embedding import Conv2dHost, EmbeddingHost, VocabParallelEmbeddingHost
from parallel_adapters.adapters.hosts.grouped import GroupedExpertsHost, GroupedLinearHost, wrap_grouped_experts
from parallel_adapters.adapters.hosts.linear import HOST_FOR_MODE
from parallel_adapters.adapters.kinds import kind_for_module
from parallel_adapters.adapters.kinds.protocol import AdapterKind
from parallel_adapters.config import pattern_key_matches
from parallel_adapters.distributed.groups import ParallelGroups
from parallel_adapters.mcore.compat import LINEAR_MODES, LinearGeometry, linear_geometry, parallel_mode_of
from parallel_adapters.mcore.moe import global_expert_modules, is_grouped_experts, shared_expert_module

_OUTPUT_LAYER_NAMES = ("output_layer", "lm_head")
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


@dataclass(frozen=True)
class Target:
    name: str
    """Module path in this rank's model (local layer index under pipeline parallelism)."""
    global_name: str
    """Module path with the global transformer layer index (used for patterns and checkpoints)."""
    module: nn.Module


def global_module_names(model: nn.Module) -> dict[str, str]:
    """Local module path -> path with global layer indices (Megatron's 1-based `layer_number`) and
    global expert indices (EP rank e's local expert i is expert e * num_local + i), i.e. the
    path in the model built at PP = EP = 1."""
    experts = global_expert_modules(model)
    offsets: dict[str, str] = {}
    for name, module in model.named_modules():
        number = getattr(module, "layer_number", None)
        match = re.search(r"(^|.*\.)layers\.(\d+)$", name)
        if match and isinstance(number, int):
            offsets[name] = f"{match.group(1)}layers.{number - 1}"
    mapping = {}
    for name, _ in model.named_modules():
        mapping[name] = _renamed(_renamed(name, experts), offsets)
    return mapping


def _renamed(name: str, prefixes: dict[str, str]) -> str:
    """`name` with its shortest leading path found in `prefixes` renamed (the outermost layer)."""
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        head = ".".join(parts[:i])
        if head in prefixes:
            return ".".join([prefixes[head], *parts[i:]])
    return name


def _matches(name: str, patterns, *, all_linear_ok: bool) -> bool:
    if patterns is None:
        return False
    if isinstance(patterns, str):
        if patterns == "all-linear":
            return all_linear_ok
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _layer_index(global_name: str, layers_pattern) -> int | None:
    if layers_pattern:
        pats = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        for pat in pats:
            match = re.search(rf"(?:^|\.){re.escape(pat)}\.(\d+)(?:\.|$)", global_name)
            if match:
                return int(match.group(1))
        return None
    match = _LAYER_INDEX.search(global_name)
    return int(match.group(1)) if match else None


def find_targets(model: nn.Module, config: Any) -> list[Target]:
    """Adaptable modules named by `config` (PEFT's target_modules, exclude_modules,
    layers_to_transform, layers_pattern), in model order.  ValueError if none match."""
    names = global_module_names(model)
    candidates, targets = [], []
    for name, module, gname, mode in _adaptable(model, names):
        candidates.append(gname)
        is_output = gname.split(".")[-1] in _OUTPUT_LAYER_NAMES
        if not _matches(gname, config.target_modules, all_linear_ok=mode in LINEAR_MODES and not is_output):
            continue
        if _matches(gname, config.exclude_modules, all_linear_ok=True):
            continue
        if config.layers_to_transform is not None:
            if _layer_index(gname, config.layers_pattern) not in config.layers_to_transform:
                continue
        targets.append(Target(name, gname, module))
    if not targets:
        shown = ", ".join(candidates[:40]) + (" ..." if len(candidates) > 40 else "")
        raise ValueError(
            f"{type(config).__name__}.target_modules={config.target_modules!r} matches no adaptable module. "
            f"Candidates: {shown or '(none: no linear layers found)'}"
        )
    return targets


def _adaptable(model: nn.Module, names: dict[str, str]):
    """(local name, module, global name, parallel mode) of every adaptable layer; a GroupedMLP
    (or its host) gives its experts' linear_fc1 / linear_fc2 under SequentialMLP's global names,
    with the local name of the host that will hold them (`...mlp.experts.linear_fc1`)."""
    for name, module in model.named_modules():
        if isinstance(module, GroupedExpertsHost) or is_grouped_experts(module):
            parent = model.get_submodule(name.rpartition(".")[0])
            for fc, mode in (("linear_fc1", "column"), ("linear_fc2", "row")):
                for e in parent.local_expert_indices:
                    yield f"{name}.{fc}", module, f"{names[name]}.local_experts.{e}.{fc}", mode
        elif isinstance(module, GroupedLinearHost):
            continue  # its experts were listed with its GroupedExpertsHost
        elif isinstance(module, AdapterHost):
            yield name, module, names[name], module.geometry.parallel_mode
        elif parallel_mode_of(module) is not None:
            yield name, module, names[name], parallel_mode_of(module)


def check_patterns_match(config: Any, kind: AdapterKind, targets: Iterable[Target], *,
                         local_only: bool) -> None:
    """A key of a pattern field (the kind's `pattern_fields`: LoRA's rank_pattern / alpha_pattern)
    that matches no targeted module is a user error.

    Under pipeline parallelism a key may match only another stage's layers: callers pass
    local_only=True there and check globally instead.
    """
    names = [t.global_name for t in targets]
    for field_name in kind.pattern_fields:
        for key in getattr(config, field_name):
            if not any(pattern_key_matches(key, n) for n in names) and not local_only:
                raise ValueError(
                    f"{type(config).__name__}.{field_name} key {key!r} matches no targeted module; targeted: "
                    + ", ".join(names[:20])
                )


def check_divisible(target: Target, geometry: LinearGeometry) -> None:
    """The base layer's split dimension must divide over the TP ranks (and its stride's blocks)."""
    if geometry.tp_size > 1:
        sharded = geometry.out_features if geometry.parallel_mode == "column" else geometry.in_features
        if geometry.parallel_mode in ("column", "row", "vocab") and sharded % (geometry.tp_size * geometry.chunks):
            raise ValueError(
                f"module {target.global_name}: size {sharded} does not divide over "
                f"{geometry.tp_size} tensor-parallel ranks"
            )


def wrap_targets(model: nn.Module, config: Any, family: AdapterKind, groups: ParallelGroups,
                 adapter_name: str, targets: list[Target], autocast_adapter_dtype: bool = True) -> list[AdapterHost]:
    """Wrap each target in the host for its parallel mode (or reuse its host) and add adapter
    `adapter_name` of `family` (or of its variant for that module) to it.  With `share_expert_adapters`,
    the routed experts of a layer share the adapter of the first one on this rank, drawn from the
    shared name's seed (the same on every EP rank)."""
    grouped = [t for t in targets if isinstance(t.module, GroupedExpertsHost) or is_grouped_experts(t.module)]
    hosts = _wrap_grouped(model, config, family, groups, adapter_name, grouped, autocast_adapter_dtype)
    owners = {}
    share = bool(getattr(config, "share_expert_adapters", False))
    for target in [t for t in targets if not any(t is g for g in grouped)]:
        module = target.module
        if isinstance(module, AdapterHost):
            host, geometry = module, module.geometry
        else:
            geometry = linear_geometry(module, groups)
            if geometry.parallel_mode == "vocab":
                geometry = dataclasses.replace(geometry, vocab_size=getattr(model, "unpadded_vocab_size", None))
            host = None
        check_divisible(target, geometry)
        kind = kind_for_module(family, config, geometry)  # e.g. the Conv2d form of LoHa
        settings = kind.settings(config, target.global_name, geometry)
        if host is None:
            host = host_class(geometry.parallel_mode)(module, geometry, target.global_name, autocast_adapter_dtype)
            _replace_module(model, target.name, host)
        host.tied_weight = _is_tied(model, geometry, target)
        shared = shared_expert_module(target.global_name) if share else None
        seed_name = shared or target.global_name
        generator = torch.Generator().manual_seed(lf.factor_seed(settings.seed, seed_name, adapter_name))
        full = kind.full_tensors(config, geometry, settings.hparams, generator)
        host.add_adapter(adapter_name, kind, settings, full, _data_rank(groups, geometry), groups.pp_rank)
        if shared is not None:
            host.share_adapter_of(owners.setdefault(shared, host), adapter_name)
        hosts.append(host)
    return hosts


def _wrap_grouped(model: nn.Module, config: Any, kind: AdapterKind, groups: ParallelGroups, adapter_name: str,
                  targets: list[Target], autocast_adapter_dtype: bool) -> list[AdapterHost]:
    """Targets on GroupedMLP experts: one GroupedLinearHost per fused weight, each expert's
    factors drawn from its SequentialMLP name's seed (hosts/grouped.py)."""
    if targets and (getattr(config, "share_expert_adapters", False)
                    or getattr(config, "init_lora_weights", True) not in (True, False, "gaussian")):
        raise NotImplementedError(f"{targets[0].name}: GroupedMLP experts take per-expert LoRA with init_lora_weights "
                                  "True/False/'gaussian' only (not share_expert_adapters, EVA, PiSSA/OLoRA)")
    by_weight: dict[str, list[Target]] = {}
    for target in targets:
        by_weight.setdefault(target.name, []).append(target)
    names = global_module_names(model)
    hosts = []
    for name, matched in by_weight.items():
        experts_path, fc = name.rsplit(".", 1)
        wrapper = model.get_submodule(experts_path)
        if not isinstance(wrapper, GroupedExpertsHost):
            parent = model.get_submodule(experts_path.rpartition(".")[0])
            wrapper = wrap_grouped_experts(wrapper, groups, names[experts_path], parent.local_expert_indices,
                                           autocast_adapter_dtype)
            _replace_module(model, experts_path, wrapper)
        host = getattr(wrapper, fc)
        by_expert = {t.global_name: t for t in matched}
        if sorted(by_expert) != sorted(host.expert_names):
            raise ValueError(f"{host.module_name}: the targets match experts {sorted(by_expert)} of a GroupedMLP "
                             "weight; its adapter covers all its experts or none (adjust target_modules)")
        settings = [kind.settings(config, e, host.geometry) for e in host.expert_names]
        full = [kind.full_tensors(config, host.geometry, s.hparams,
                                  torch.Generator().manual_seed(lf.factor_seed(s.seed, e, adapter_name)))
                for s, e in zip(settings, host.expert_names)]
        host.add_grouped_adapter(adapter_name, kind, settings, full, _data_rank(groups, host.geometry), groups.pp_rank)
        hosts.append(host)
    return hosts


def _data_rank(groups: ParallelGroups, geometry: LinearGeometry) -> int:
    """Which data this layer sees, for its dropout seeds: the DP rank, or for a routed expert
    (whose tokens come from the whole expert-TP x EP group) its expert-DP and EP ranks."""
    if geometry.expert:
        return groups.expert_dp_rank * groups.ep_size + groups.ep_rank
    return groups.dp_rank


def _is_tied(model: nn.Module, geometry: LinearGeometry, target: Target) -> bool:
    """The word embedding or output layer of a Megatron GPT that shares one table between them."""
    tied = bool(getattr(model, "share_embeddings_and_output_weights", False))
    return tied and (geometry.parallel_mode == "vocab" or target.global_name.split(".")[-1] in _OUTPUT_LAYER_NAMES)


def host_class(parallel_mode: str) -> type[AdapterHost]:
    """The host wrapping a layer of `parallel_mode` (mcore.compat.LinearGeometry)."""
    hosts = {**HOST_FOR_MODE, "vocab": VocabParallelEmbeddingHost, "embedding": EmbeddingHost, "conv2d": Conv2dHost}
    return hosts[parallel_mode]


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def adapted_layers(model: nn.Module) -> list[tuple[str, AdapterHost]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterHost)]


def unwrap_all(model: nn.Module) -> None:
    """Put every base layer back in place of its wrapper (weights as they are now)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, GroupedExpertsHost):
            _replace_module(model, name, module.base_layer)
    for name, layer in adapted_layers(model):
        _replace_module(model, name, layer.base_layer)
