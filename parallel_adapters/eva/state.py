"""EVA's result per layer (`EvaLayerState`) and how it goes into the adapters (`load_into_model`)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from parallel_adapters.adapters.kinds.lora import LORA_A, replace_factors
from parallel_adapters.adapters.model import AdapterModel
from parallel_adapters.adapters.pretrained import PEFT_PREFIX
from parallel_adapters.distributed.geometry import LINEAR_MODES
from parallel_adapters.distributed.groups import ParallelGroups
from parallel_adapters.distributed.sharding import ShardSpec
from parallel_adapters.config import EvaConfig, lora_scaling
from parallel_adapters.distributed import collectives as C
from parallel_adapters.eva import allocation as A


@dataclass(frozen=True)
class EvaLayerState:
    """EVA's result for one layer, as held by this rank.

    components: this rank's A shard [rank, I] (column / plain layers, TP-replicated) or
    [rank, I/t] (row layers, `spec` = ShardSpec(dim=1)); whitened if EvaConfig.whiten.
    """

    components: torch.Tensor
    singular_values: torch.Tensor
    rank: int
    alpha: float
    spec: ShardSpec
    in_features: int
    r_initial: int
    converged: bool


EvaStateDict = dict[str, EvaLayerState]


def peft_state_dict(state: EvaStateDict, groups: ParallelGroups) -> dict[str, torch.Tensor]:
    """PEFT's form of `state`: {"base_model.model.<name>": full components [rank, in_features]}
    (float64, as PEFT's from its second step on).  Row layers' shards are all-gathered over TP (collective, in `state`'s order,
    which is the same on every TP rank)."""
    out = {}
    for name, s in state.items():
        comps = s.components
        if s.rank == 0:
            comps = comps.new_zeros(0, s.in_features)
        elif not s.spec.replicated and groups.tp_size > 1:
            comps = s.spec.unshard(C.all_gather_tensor(comps.contiguous(), groups.tp_group))
        out[PEFT_PREFIX + name] = comps
    return out


def eva_layers(model: AdapterModel, adapter_name: str) -> list[tuple[str, Any]]:
    """The hosts EVA initialises: LoRA on linear layers.  Others keep their default init, as PEFT
    leaves embeddings and convolutions (its UNSUPPORTED_LORA_MODULES)."""
    return [(n, layer) for n, layer in model.adapter_layers()
            if layer.has_adapter(adapter_name) and layer.geometry.parallel_mode in LINEAR_MODES
            and LORA_A in layer.adapter_tensors(adapter_name)]


def load_into_model(model: AdapterModel, state: Mapping[str, Any], adapter_name: str) -> None:
    """PEFT's _load_eva_state_dict for sharded layers; then the config's patterns (all stages).
    Names may carry PEFT's "base_model.model." prefix."""
    state = {k.removeprefix(PEFT_PREFIX): v for k, v in state.items()}
    config = model.peft_config[adapter_name]
    eva = config.eva_config or EvaConfig()
    result: dict[str, tuple[int, float]] = {}
    missing = []
    for _, layer in eva_layers(model, adapter_name):
        name, r0, alpha0 = layer.module_name, layer.r[adapter_name], float(layer.lora_alpha[adapter_name])
        entry = state.get(name)
        if entry is None:
            missing.append(name)
            result[name] = (r0, alpha0)
            continue
        local_a, k, alpha = _entry_factors(entry, layer, r0, alpha0, eva)
        result[name] = (k, alpha)
        if k == 0:
            layer.delete_adapter(adapter_name)
            continue
        g = layer.geometry
        local_b = torch.zeros(layer.spec_b.local_shape((g.out_features, k), g.tp_size))
        replace_factors(layer, adapter_name, local_a, local_b, k, alpha, lora_scaling(alpha, k, config.use_rslora))
    groups = model.groups
    stages = [result] if groups.pp_size == 1 else C.all_gather_objects(result, groups.pp_group)
    merged = {k: v for st in stages for k, v in st.items()}
    kept = [n for n, (k, _) in merged.items() if k > 0]
    model.peft_config[adapter_name] = config.replace(
        rank_pattern={n: k for n, (k, _) in merged.items() if k > 0 and k != config.r},
        alpha_pattern={n: a for n, (k, a) in merged.items() if k > 0 and a != config.lora_alpha},
        target_modules=config.target_modules if len(kept) == len(merged) else tuple(kept),
    )
    if missing:
        warnings.warn(f"EVA: no components for {missing}; their adapters keep the default initialisation")


def _entry_factors(entry, layer, r0: int, alpha0: float, eva: EvaConfig) -> tuple[torch.Tensor, int, float]:
    """(this rank's A shard, rank, alpha) from an EvaLayerState or a PEFT-style full tensor."""
    g = layer.geometry
    if isinstance(entry, EvaLayerState):
        local, k, alpha = entry.components, entry.rank, entry.alpha
    elif isinstance(entry, torch.Tensor):
        k = int(entry.shape[0])
        local = layer.spec_a.shard(entry, g.tp_rank, g.tp_size)
        alpha = A.adjusted_alpha(alpha0, r0, k, eva.adjust_scaling_factors)
    else:
        raise ValueError(f"EVA state for {layer.module_name}: expected EvaLayerState or a tensor, got {type(entry).__name__}")
    want = layer.spec_a.local_shape((k, g.in_features), g.tp_size)
    if tuple(local.shape) != want:
        raise ValueError(f"EVA state for {layer.module_name}: components of shape {tuple(local.shape)}, "
                         f"this rank's A shard needs {want}")
    return local, k, alpha
