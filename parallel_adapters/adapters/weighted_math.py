"""Pure math of PEFT's `add_weighted_adapter` on one host's LoRA factor shards (shapes as
`functional.py`: A [r, I], B [O, r]; on a TP host one of them is this rank's shard).

PEFT's rules, restated (peft/tuners/lora/model.py, peft/utils/merge_utils.py), for adapters i with
weight w_i and scale s_i:

    linear, ties, dare_*, magnitude_prune   per factor, the merge of PEFT's merge_utils with weights
                                            sign(w_i s_i) sqrt|w_i s_i| on A and sqrt|w_i s_i| on B
    cat                                     A = [w_1 s_1 A_1; ...], B = [B_1, ...]
    svd                                     decompose/lowrank.py on B = [w_1 s_1 B_1, ...], A = [A_1; ...]

Elementwise steps (weighted sums, sign election, disjoint merge) are shard-local.  What is not:
the magnitude threshold of a split factor (`global_kth_largest`: bisection over the float's bits,
one all-reduce of one count per tensor per step) and DARE's random masks (`dare_mask`: drawn over the
WHOLE factor from a seeded generator, then this rank's shard taken, so the TP size cannot change them).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from parallel_adapters.distributed import collectives

FACTOR_WISE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_WISE = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATIONS = FACTOR_WISE + ("cat",) + SVD_WISE


def factor_weights(weights: Sequence[float], scalings: Sequence[float]) -> tuple[list[float], list[float]]:
    """(weights on A, weights on B): the sign of w s goes on A only, so B A keeps it once."""
    roots = [math.sqrt(abs(w * s)) for w, s in zip(weights, scalings)]
    return [r if w * s >= 0 else -r for r, w, s in zip(roots, weights, scalings)], roots


def cat_factors(a_list: Sequence[torch.Tensor], b_list: Sequence[torch.Tensor], weights: Sequence[float],
                scalings: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's "cat": A = [w_i s_i A_i] stacked by rows, B = [B_i] side by side (rank sum r_i)."""
    a = torch.cat([w * s * a_i for a_i, w, s in zip(a_list, weights, scalings)], dim=0)
    return a, torch.cat(list(b_list), dim=1)


def weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    return sum(w * t for t, w in zip(tensors, weights))


def majority_sign_mask(stacked: torch.Tensor, method: str) -> torch.Tensor:
    """TIES' sign election over dim 0 ("total": the sign of the sum; "frequency": of the sign count)."""
    if method not in ("total", "frequency"):
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {method!r}")
    sign = stacked.sign()
    votes = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    return sign == torch.where(votes >= 0, 1.0, -1.0).to(sign.dtype)


def disjoint_merge(weighted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over dim 0 of the entries agreeing with the elected sign."""
    return (weighted * mask).sum(dim=0) / mask.sum(dim=0).clamp(min=1).to(weighted.dtype)


def _magnitude_bits(x: torch.Tensor) -> torch.Tensor:
    """|x| as int64 whose order is |x|'s order (IEEE floats >= 0 sort as their bit patterns)."""
    mag = x.detach().abs()
    ints = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
            torch.bfloat16: torch.int16}[mag.dtype]
    return mag.contiguous().view(ints).to(torch.int64)


def global_kth_largest(tensors: Sequence[torch.Tensor], ks: Sequence[int], group) -> list[torch.Tensor]:
    """Per tensor (this rank's shard of it over `group`), the bit pattern of the k-th largest |x|
    over the whole tensor, by bisection: ~64 steps, each ONE all-reduce of len(tensors) counts."""
    bits = [_magnitude_bits(t).reshape(-1) for t in tensors]
    need = torch.tensor(list(ks), dtype=torch.int64)
    lo = torch.zeros(len(bits), dtype=torch.int64)  # count(|x| >= lo) >= k holds (k <= numel)
    hi = torch.tensor([int(b.max()) + 1 if b.numel() else 1 for b in bits], dtype=torch.int64)
    hi = collectives.all_reduce_max_(hi, group)  # count(|x| >= hi) = 0 < k
    while bool((hi - lo > 1).any()):
        mid = lo + (hi - lo) // 2  # (lo + hi) overflows int64 for float64 magnitudes >= 2
        counts = torch.stack([(b >= m).sum() for b, m in zip(bits, mid)]).to(torch.int64)
        collectives.all_reduce_(counts, group)
        ok = counts >= need
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    return list(lo)


def magnitude_masks(tensors: Sequence[torch.Tensor], density: float, numels: Sequence[int],
                    group) -> list[torch.Tensor]:
    """PEFT's magnitude pruning masks: keep the int(density * numel) largest |x| of each WHOLE
    tensor (`numels`: the whole tensors' sizes).  Entries tied with the threshold are all kept
    (PEFT's topk keeps an arbitrary subset of them)."""
    ks = [int(density * n) for n in numels]
    thresholds = global_kth_largest(tensors, [max(k, 1) for k in ks], group)
    return [(_magnitude_bits(t) >= th) & (k > 0) for t, th, k in zip(tensors, thresholds, ks)]


def dare_mask(global_shape: Sequence[int], density: float, generator: torch.Generator,
              shard: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """DARE's Bernoulli(density) keep-mask over the WHOLE tensor, then this rank's shard of it."""
    full = torch.bernoulli(torch.full(tuple(global_shape), density, dtype=torch.float64), generator=generator)
    return shard(full).bool()


def merge_task_tensors(combination: str, tensors: Sequence[torch.Tensor], weights: Sequence[float],
                       masks: Sequence[torch.Tensor] | None, density: float | None,
                       majority_sign_method: str) -> torch.Tensor:
    """One factor's merge (`combination` without "_svd"), given the pruning masks (None: linear)."""
    base = combination.removesuffix("_svd")
    if base in ("linear", "svd"):
        return weighted_sum(tensors, weights)
    pruned = [t * m.to(t.dtype) for t, m in zip(tensors, masks)]
    if base.startswith("dare") and density < 1:  # PEFT neither prunes nor rescales at density >= 1
        pruned = [t / density for t in pruned]
    stacked = torch.stack(pruned)
    if base == "magnitude_prune" or base == "dare_linear":
        return weighted_sum(pruned, weights)
    sign_mask = majority_sign_mask(stacked, majority_sign_method)
    w = torch.tensor(list(weights), dtype=stacked.dtype).view(-1, *([1] * (stacked.dim() - 1)))
    return disjoint_merge(stacked * w, sign_mask)
