"""EVA rank redistribution, pure functions mirroring PEFT 0.21.2 (`peft/tuners/lora/eva.py`).

PEFT: every target layer l has an initial rank r_l (rank_pattern or r) and a cap
round(r_l * rho); the budget is sum(r_l) over all target layers.  The explained-variance ratios
of all layers' first `cap` components are pooled and the `budget` largest win one rank each
(`_get_rank_distribution`).  Layers whose input equals an earlier layer's input (same hash on the
first batch) share that layer's SVD; such a group gets the group's largest cap, and after the
allocation the SVD-owning layer is swapped to hold the group's largest count.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Hashable, Mapping

import torch

RHO_THRESHOLD = 1000


def effective_rho(rho: float, r: int, max_param_dim: int) -> float:
    """PEFT caps unusually large rho (> 1000) at max_param_dim // r (r: the config's global r)."""
    if rho > RHO_THRESHOLD:
        return min(rho, max_param_dim // r)
    return rho


def max_rank(r: int, rho: float) -> int:
    """Per-layer cap: Python round(r * rho), i.e. round-half-to-even (round(4.5) == 4)."""
    return round(r * rho)


def rank_budget(initial_ranks: Mapping[str, int]) -> int:
    """Total budget: sum of the initial ranks of *all* target layers (shared-input ones too)."""
    return sum(initial_ranks.values())


def shared_input_map(fingerprints: Mapping[str, Hashable]) -> dict[str, str]:
    """{layer: owner} for layers whose input fingerprint equals an earlier layer's.

    Mirrors PEFT's find_equal_values + equal_inputs_map: the first layer (mapping order) with a
    given fingerprint owns the SVD; unique layers do not appear.
    """
    groups: dict[Hashable, list[str]] = defaultdict(list)
    for name, fp in fingerprints.items():
        groups[fp].append(name)
    return {m: names[0] for names in groups.values() if len(names) > 1 for m in names[1:]}


def group_max_ranks(max_ranks: Mapping[str, int], shared: Mapping[str, str]) -> dict[str, int]:
    """Give every layer of a shared-input group the group's largest cap (as PEFT does)."""
    members: dict[str, list[str]] = defaultdict(list)
    for layer, owner in shared.items():
        members[owner].append(layer)
    out = dict(max_ranks)
    for owner, layers in members.items():
        group = [owner, *layers]
        top = max(max_ranks[n] for n in group)
        for n in group:
            out[n] = top
    return out


def _pool(
    ratios: Mapping[str, torch.Tensor], max_ranks: Mapping[str, int], shared: Mapping[str, str]
) -> tuple[list[str], list[str], torch.Tensor]:
    """Layer order (owners, then shared members), per-entry layer keys and pooled ratios."""
    source = {**{k: k for k in ratios}, **shared}
    keys: list[str] = []
    values: list[torch.Tensor] = []
    for layer, owner in source.items():
        v = ratios[owner][: max_ranks[owner]].reshape(-1)
        keys.extend([layer] * int(v.numel()))
        values.append(v)
    return list(source), keys, torch.cat(values)


def allocate_ranks(
    explained_variance_ratio: Mapping[str, torch.Tensor],
    max_ranks: Mapping[str, int],
    budget: int,
    shared_inputs: Mapping[str, str] | None = None,
    *,
    stable: bool = False,
) -> dict[str, int]:
    """New rank per layer, exactly as PEFT's `_get_rank_distribution`.

    explained_variance_ratio: {owner layer: ratios (descending)} in model order; max_ranks: caps
    keyed by owner (use `group_max_ranks` first); shared_inputs: {layer: owner} (its entries are
    counted again under the member's name, as PEFT does).  The `budget` largest pooled ratios get
    a rank each; ties are broken by torch.argsort(descending=True) on the pooled vector in this
    order, bit-identical to PEFT on the same device (`stable=True`: earlier entry wins, portable).
    Layers winning nothing get 0 (PEFT then drops their LoRA).  Finally each group's owner is
    swapped to hold the largest count, since only the owner's components exist.
    """
    shared = dict(shared_inputs or {})
    layers, keys, pooled = _pool(explained_variance_ratio, max_ranks, shared)
    order = torch.argsort(pooled, descending=True, stable=stable)
    counts = {layer: 0 for layer in layers}
    for i in order[: max(budget, 0)].tolist():
        counts[keys[i]] += 1
    for layer, owner in shared.items():
        if counts[owner] < counts[layer]:
            counts[owner], counts[layer] = counts[layer], counts[owner]
    return counts


def adjusted_alpha(alpha: float, r_initial: int, r_new: int, adjust: bool = True) -> float:
    """PEFT's adjust_scaling_factors: alpha * r_new / r_initial when the rank changed.

    Keeps alpha / r (the plain-LoRA scaling) fixed; with rsLoRA (alpha / sqrt(r)) PEFT applies the
    same factor, so the scaling is *not* preserved there.  Unchanged rank (or adjust=False)
    returns alpha untouched; r_new == 0 gives 0.0 (PEFT removes such a LoRA layer anyway).
    """
    if not adjust or r_new == r_initial:
        return alpha
    return alpha * r_new / r_initial
