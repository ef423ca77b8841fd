"""`AdapterModel.add_weighted_adapter`: PEFT's combination of LoRA adapters into a new one
(peft/tuners/lora/model.py), each TP rank writing only its own factor shards.

The new adapter is added as PEFT adds it (adapters[0]'s config with r = lora_alpha = the new rank,
the union of the targets, no rank/alpha patterns), then on every host, in model order, its factors
are replaced by the combination (`weighted_math.py`, `decompose/lowrank.py`).  Traffic per host:

    linear, cat                     none (the factors combine shard by shard)
    svd                             one all-gather of t [R, R] (R = sum of the ranks) + 3 t k numbers;
                                    with svd_clamp, one all-gather of the split new factor (O k or k I)
    ties, magnitude_prune           ~64 all-reduces of a few counts (the split factors' thresholds)
    dare_linear, dare_ties          none (masks drawn over the whole factor from the config's seed)
    ties_svd, dare_*_svd,           they prune each update s_i B_i A_i itself, so the merged update is no
    magnitude_prune_svd             longer low-rank: each rank forms its SHARD of each update (W-shard
                                    sized, local), and its top-k SVD is `decompose/svd.split_svd` (the
                                    converging mode; sketches only), plus the thresholds as above

Never a block of sum_i w_i s_i B_i A_i that the rank does not own.  DARE's masks on an update are
drawn over the whole [O, I] (compute on every rank, not traffic) so the TP size cannot change them.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Sequence

import torch

from parallel_adapters.adapters import functional as lf
from parallel_adapters.adapters import weighted_math as wm
from parallel_adapters.adapters.hosts.base import AdapterHost
from parallel_adapters.adapters.inject import adapted_layers
from parallel_adapters.adapters.kinds.lora import EMBEDDING_A, EMBEDDING_B, LORA, LORA_A, LORA_B
from parallel_adapters.config import LoraConfig
from parallel_adapters.decompose import lowrank, svd
from parallel_adapters.distributed import collectives
from parallel_adapters.distributed.sharding import ShardSpec
from parallel_adapters.distributed.groups import GROUP_OF_ONE

NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune", "ties_svd", "dare_linear_svd",
                 "dare_ties_svd", "magnitude_prune_svd")


def new_rank(combination: str, ranks: Sequence[int], svd_rank: int | None) -> int:
    """PEFT's rank of the combined adapter."""
    if combination in wm.FACTOR_WISE:
        if len(set(ranks)) != 1:
            raise ValueError(f"combination_type={combination!r} needs adapters of one rank r, got {list(ranks)}")
        return ranks[0]
    if combination == "cat":
        return sum(ranks)
    return svd_rank or max(ranks)


def union_targets(configs: Sequence[LoraConfig]) -> Any:
    """PEFT's target_modules of the combination: regexes joined by "|", or the union of the lists."""
    kinds = {isinstance(c.target_modules, str) for c in configs}
    if len(kinds) > 1:
        raise ValueError("add_weighted_adapter: the adapters' target_modules mix a regex string and lists")
    if kinds == {True}:
        return "|".join(f"({c.target_modules})" for c in configs)
    merged: list = []
    for c in configs:
        merged += [t for t in c.target_modules if t not in merged]
    return tuple(merged)


def add_weighted_adapter(model, adapters: list[str], weights: list[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None,
                         svd_clamp: float | None = None, svd_full_matrices: bool = True,
                         svd_driver: str | None = None, density: float | None = None,
                         majority_sign_method: str = "total") -> None:
    """See `AdapterModel.add_weighted_adapter` (PEFT's signature and meanings)."""
    if adapter_name in model.peft_config:  # PEFT returns silently; say so
        warnings.warn(f"add_weighted_adapter: adapter {adapter_name!r} already exists; nothing was added",
                      stacklevel=3)
        return
    configs = _check_sources(model, adapters, weights)
    combination = "linear" if len(adapters) == 1 else combination_type  # as PEFT
    if combination not in wm.COMBINATIONS:
        raise ValueError(f"combination_type must be one of {list(wm.COMBINATIONS)}, got {combination!r}")
    if combination in NEEDS_DENSITY and (density is None or density < 0):
        raise ValueError(f"combination_type={combination!r} needs density >= 0, got {density!r}")
    if combination in NEEDS_DENSITY and density >= 1:
        warnings.warn(f"add_weighted_adapter: density={density} >= 1 prunes nothing", stacklevel=3)
    ranks = [max(c.r, *c.rank_pattern.values()) if c.rank_pattern else c.r for c in configs]
    r = new_rank(combination, ranks, svd_rank)
    config = configs[0].replace(r=r, lora_alpha=r, target_modules=union_targets(configs), alpha_pattern={},
                                rank_pattern={}, init_lora_weights=True)  # never re-run PiSSA/OLoRA on W
    model.add_adapter(adapter_name, config)
    options = dict(density=density, majority_sign_method=majority_sign_method, svd_clamp=svd_clamp,
                   svd_driver=svd_driver, seed=config.seed)
    try:
        for _, host in adapted_layers(model.model):
            if host.has_adapter(adapter_name):
                _combine_host(host, adapter_name, adapters, weights, combination, r, **options)
    except BaseException:
        model.delete_adapter(adapter_name)
        raise


def _check_sources(model, adapters: list[str], weights: list[float]) -> list[LoraConfig]:
    if not adapters or len(adapters) != len(weights):
        raise ValueError(f"add_weighted_adapter: {len(adapters)} adapters and {len(weights)} weights")
    for name in adapters:
        model._require(name)
        if getattr(model.peft_config[name], "use_dora", None) is not False:
            raise ValueError(f"add_weighted_adapter combines plain LoRA adapters; {name!r} is a "
                             f"{type(model.peft_config[name]).__name__}"
                             f"{' with use_dora' if getattr(model.peft_config[name], 'use_dora', False) else ''}")
        if model.peft_config[name].conv_layout != "peft":
            raise ValueError(f"add_weighted_adapter combines LoRA in PEFT's layout; {name!r} has "
                             f"LoraConfig.conv_layout={model.peft_config[name].conv_layout!r}")
    return [model.peft_config[n] for n in adapters]


def _combine_host(host: AdapterHost, adapter_name: str, adapters: Sequence[str], weights: Sequence[float],
                  combination: str, r: int, *, density, majority_sign_method, svd_clamp, svd_driver, seed) -> None:
    present = [(n, w) for n, w in zip(adapters, weights) if host.has_adapter(n) and host.kinds[n] is LORA]
    if not present:
        raise ValueError(f"{host.module_name}: none of the adapters {list(adapters)} is a LoRA adapter here")
    names, weights = [n for n, _ in present], [w for _, w in present]
    name_a, name_b = (EMBEDDING_A, EMBEDDING_B) if EMBEDDING_A in host.adapter_tensors(names[0]) else (LORA_A, LORA_B)
    target = host.adapter_tensors(adapter_name)
    dtype = torch.promote_types(target[name_a].dtype, torch.float32)
    a_list = [host.adapter_tensors(n)[name_a].detach().to(dtype) for n in names]
    b_list = [host.adapter_tensors(n)[name_b].detach().to(dtype) for n in names]
    scalings = [host.hparams(n)["scaling"] for n in names]
    decls = {d.name: d for d in host.tensor_decls(adapter_name)}
    g = host.geometry
    groups = {t: GROUP_OF_ONE if decls[t].spec.replicated else g.tp_group for t in (name_a, name_b)}
    if combination == "cat":
        a, b = wm.cat_factors(a_list, b_list, weights, scalings)
        a = torch.cat([a, a.new_zeros(r - a.shape[0], *a.shape[1:])])  # sources of lower rank here: zeros
        b = torch.cat([b, b.new_zeros(b.shape[0], r - b.shape[1], *b.shape[2:])], dim=1)
    elif combination == "svd":
        a, b = _svd(host, a_list, b_list, weights, scalings, r, decls[name_a], decls[name_b], svd_clamp, svd_driver)
    elif combination in wm.SVD_WISE:
        a, b = _pruned_svd(host, adapter_name, combination, a_list, b_list, weights, scalings, r, decls[name_a],
                           density, majority_sign_method, svd_clamp, seed)
    else:
        w_a, w_b = wm.factor_weights(weights, scalings)
        generator = torch.Generator().manual_seed(lf.factor_seed(seed, host.module_name, adapter_name, "dare"))
        merged = []
        for t, tensors, w in ((name_a, a_list, w_a), (name_b, b_list, w_b)):
            masks = _masks(combination, tensors, density, decls[t], groups[t], generator, g)
            merged.append(wm.merge_task_tensors(combination, tensors, w, masks, density, majority_sign_method))
        a, b = merged
    local = {name_a: a.to(target[name_a].dtype), name_b: b.to(target[name_b].dtype)}
    host.replace_tensors(adapter_name, local, host.hparams(adapter_name))


def _masks(combination, tensors, density, decl, group, generator, g) -> list[torch.Tensor] | None:
    if combination == "linear":
        return None
    if density >= 1:
        return [torch.ones_like(t, dtype=torch.bool) for t in tensors]
    if combination.startswith("dare"):
        return [wm.dare_mask(decl.global_shape, density, generator, lambda f: decl.spec.shard(f, g.tp_rank, g.tp_size))
                for _ in tensors]
    numel = torch.Size(decl.global_shape).numel()
    return wm.magnitude_masks(tensors, density, [numel] * len(tensors), group)


def _svd(host, a_list, b_list, weights, scalings, r, decl_a, decl_b, svd_clamp, svd_driver):
    g = host.geometry
    if g.conv is not None:
        raise ValueError(f"{host.module_name}: combination_type='svd' is not supported on Conv2d layers here; "
                         "use 'linear' or 'cat'")
    b_cat = torch.cat([w * s * b for b, w, s in zip(b_list, weights, scalings)], dim=1)
    a_cat = torch.cat(a_list, dim=0)
    split = None if decl_a.spec.replicated and decl_b.spec.replicated else ("b" if decl_a.spec.replicated else "a")
    group = g.tp_group if split else GROUP_OF_ONE
    index = torch.arange(decl_a.global_shape[1])
    assert split != "a" or decl_a.spec.dim == 1, "a row host splits A along its input dim"
    in_index = dataclasses.replace(decl_a.spec, dim=0).shard(index, g.tp_rank, g.tp_size) if split == "a" else index
    a, b = lowrank.product_svd(b_cat, a_cat, r, split, in_index, group, driver=svd_driver)
    if svd_clamp is not None:
        a, b = lowrank.quantile_clamp(a, b, svd_clamp, split, group)
    return a, b


def _pruned_svd(host, adapter_name, combination, a_list, b_list, weights, scalings, r, decl_a, density,
                majority_sign_method, svd_clamp, seed):
    """PEFT's "<merge>_svd": merge the pruned updates s_i B_i A_i, then their top-r SVD (this
    rank's shard of each update only; the SVD by sketches)."""
    g = host.geometry
    if g.conv is not None or g.parallel_mode not in ("column", "row", "replicated"):
        raise ValueError(f"{host.module_name}: combination_type={combination!r} is supported on linear layers "
                         "only here; use 'linear' or 'cat'")
    row, split = g.parallel_mode == "row", g.parallel_mode in ("column", "row")
    group = g.tp_group if split else GROUP_OF_ONE
    deltas = [lf.lora_delta(a, b, s) for a, b, s in zip(a_list, b_list, scalings)]  # this shard's [O(/t), I(/t)]
    out_f, in_f = g.out_features, decl_a.global_shape[1]
    w_spec = dataclasses.replace(decl_a.spec, dim=1) if row else (ShardSpec(dim=0, chunks=g.chunks) if split
                                                                   else ShardSpec())
    base = combination.removesuffix("_svd")
    generator = torch.Generator().manual_seed(lf.factor_seed(seed, host.module_name, adapter_name, "dare"))
    if density >= 1:
        masks = [torch.ones_like(d, dtype=torch.bool) for d in deltas]
    elif base.startswith("dare"):
        masks = [wm.dare_mask((out_f, in_f), density, generator, lambda f: w_spec.shard(f, g.tp_rank, g.tp_size))
                 for _ in deltas]
    else:
        masks = wm.magnitude_masks(deltas, density, [out_f * in_f] * len(deltas), group)
    merged = wm.merge_task_tensors(base, deltas, weights, masks, density, majority_sign_method)
    m_local = merged.T if row else merged  # row-split for split_svd: W's rows (column) or columns (row)
    n = m_local.shape[1]
    b_cols = svd.block_size(r, m_local.shape[0] * collectives.group_size(group), n, None)
    start = torch.Generator().manual_seed(lf.factor_seed(seed, host.module_name, adapter_name, "svd"))
    omega = torch.randn(n, b_cols, generator=start, dtype=torch.float64).to(m_local.dtype)
    result = svd.split_svd(m_local, min(r, b_cols), omega, group)
    if not result.converged:
        warnings.warn(f"{host.module_name}: the SVD of the merged update did not converge in {result.iterations} "
                      f"iterations (subspace moved {result.distance:.2e}): nearly tied singular values",
                      stacklevel=4)
    index = torch.arange(in_f)
    if row:  # W's right singular vectors are M's left ones (split)
        in_index = dataclasses.replace(decl_a.spec, dim=0).shard(index, g.tp_rank, g.tp_size)
        signs = svd.largest_entry_signs(result.u_local, in_index, group)
        a, b = (result.u_local * signs).T, result.v * signs * result.s
    else:
        signs = svd.largest_entry_signs(result.v, index, GROUP_OF_ONE)
        a, b = (result.v * signs).T, result.u_local * signs * result.s
    if a.shape[0] < r:  # the update has fewer than r dimensions
        a = torch.cat([a, a.new_zeros(r - a.shape[0], a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], r - b.shape[1])], dim=1)
    if svd_clamp is not None:
        a, b = lowrank.quantile_clamp(a, b, svd_clamp, ("a" if row else "b") if split else None, group)
    return a.contiguous(), b.contiguous()
