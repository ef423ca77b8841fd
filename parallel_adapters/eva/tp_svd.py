"""SVD of a column-split matrix M = [M_1 | ... | M_t] across tensor-parallel ranks (EVA).

Row-parallel layer inputs are feature shards; each TP rank ends with exactly its slice of the
right singular vectors.  Randomized range finder: Y = sum_i M_i Omega_i (all-reduced over TP,
[rows, s]), p power iterations, Q = orth(Y), B_i = Q^T M_i, Gram B B^T = sum_i B_i B_i^T
(all-reduced, [s, s]), eigendecomposition, V_i = S^-1 U^T B_i.  Any other layer runs the same
algorithm with a group of one, so TP=1 equals TP=t.  Float64 throughout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from parallel_adapters.distributed import collectives as C
from parallel_adapters.distributed.groups import ParallelGroups
from parallel_adapters.eva.statistics import PCASketch

F64 = torch.float64
OVERSAMPLE = 10
"""Extra columns of the randomized range finder beyond the components kept."""
POWER_ITERS = 3
"""Subspace (power) iterations of the range finder; each is one [n, s] all-reduce over TP."""
_REL_TOL = 1e-7
"""Singular values below this fraction of the largest are treated as 0 (Gram precision)."""


def _sum_(tensors: Sequence[torch.Tensor], group, size: int) -> None:
    """Size-aware: a group of one is never touched."""
    if size > 1 and tensors:
        C.all_reduce_coalesced_(list(tensors), group)


def _gather(x: torch.Tensor, group, size: int) -> list[torch.Tensor]:
    return [x] if size == 1 else C.all_gather_tensor(x, group)


# ----------------------------------------------------------------------------------------------
# SVD of a column-split matrix M = [M_1 | ... | M_t]: row-parallel inputs over TP; any other
# layer's rows with a group of one (the same randomized algorithm, so TP=1 equals TP=t)
# ----------------------------------------------------------------------------------------------

@dataclass
class SVDJob:
    """One matrix: this rank's column block `m` [rows, I_i]; `omega` this rank's rows of the
    shared Gaussian test matrix [I_i, s] (None: rows <= s, exact via the [rows, rows] Gram);
    `extras` partial sums that ride along with the Gram all-reduce."""

    m: torch.Tensor
    keep: int
    omega: torch.Tensor | None
    extras: torch.Tensor


def tp_svd(jobs: Sequence[SVDJob], group, size: int, niter: int = POWER_ITERS
           ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(singular values [keep], this rank's right singular vectors [keep, I_i], summed extras).

    Randomized range finder on the shared row space: Y = sum_i M_i Omega_i (all-reduce [rows, s]),
    `niter` power iterations Y = sum_i M_i (M_i^T orth(Y)), Q = orth(Y), B_i = Q^T M_i, Gram
    G = sum_i B_i B_i^T ([s, s] all-reduce), G = U L U^T, V_i = L^-1/2 U^T B_i.  Every TP rank
    ends with exactly its slice of the components; all jobs share each collective.
    """
    rand = [j for j in jobs if j.omega is not None]
    ys = [j.m @ j.omega for j in rand]
    if rand:
        _sum_(ys, group, size)
        for _ in range(niter):
            ys = [j.m @ (j.m.T @ torch.linalg.qr(y).Q) for j, y in zip(rand, ys)]
            _sum_(ys, group, size)
    qs = iter([torch.linalg.qr(y).Q for y in ys])
    bs = [next(qs).T @ j.m if j.omega is not None else j.m for j in jobs]
    grams = [b @ b.T for b in bs]
    extras = [j.extras.clone() for j in jobs]
    _sum_(grams + extras, group, size)
    return [_from_gram(j.keep, b, g) + (e,) for j, b, g, e in zip(jobs, bs, grams, extras)]


def _from_gram(keep: int, b: torch.Tensor, gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    evals, evecs = torch.linalg.eigh(gram)
    evals, evecs = evals.flip(0), evecs.flip(1)
    k = min(keep, evals.numel())
    s = evals[:k].clamp_min(0).sqrt()
    live = s > (s[0] * _REL_TOL if k else 0)
    s = torch.where(live, s, torch.zeros_like(s))
    v = (evecs[:, :k].T @ b) * torch.where(live, 1.0 / s.clamp_min(1e-300), torch.zeros_like(s))[:, None]
    sv = torch.zeros(keep, dtype=b.dtype, device=b.device)
    comps = torch.zeros(keep, b.shape[1], dtype=b.dtype, device=b.device)
    sv[:k], comps[:k] = s, v
    return sv, comps


def update_job(state: PCASketch | None, rows: torch.Tensor, keep: int, omega_fn
                   ) -> tuple[SVDJob, Callable]:
    """statistics.update on (a feature shard of) new rows: the stacked matrix of PEFT's partial_fit,
    split by columns; returns the job and `finish(result) -> PCASketch` (this rank's mean and
    components, the global total)."""
    n_new = rows.shape[0]
    batch_mean = rows.mean(dim=0)
    centered = rows - batch_mean
    if state is None or state.n_samples == 0:
        m, n_old = centered, 0
        extras = torch.stack([centered.square().sum(), centered.new_zeros(())])
        mean = batch_mean
    else:
        n_old = state.n_samples
        diff = state.mean - batch_mean
        factor = math.sqrt(n_old * n_new / (n_old + n_new))
        m = torch.cat([state.singular_values[:, None] * state.components, centered, factor * diff[None]])
        extras = torch.stack([centered.square().sum(), diff.square().sum()])
        mean = (state.mean * n_old + rows.sum(dim=0)) / (n_old + n_new)
    n_total = n_old + n_new

    def finish(result) -> PCASketch:
        s, v, e = result
        total = e[0] + (n_old * n_new / n_total) * e[1]
        if state is not None and state.n_samples:
            total = total + state.total_sq_dev
        return PCASketch(v, s, mean, n_total, total)

    return _job(m, keep, omega_fn, extras), finish


def merge_job(sketches: Sequence[PCASketch], keep: int, omega_fn) -> tuple[SVDJob, Callable]:
    """statistics.merge on feature shards (components and means are this rank's slices)."""
    live = [s for s in sketches if s.n_samples > 0]
    n_total = sum(s.n_samples for s in live)
    mean = sum(s.mean * (s.n_samples / n_total) for s in live)
    deltas = [s.mean - mean for s in live]
    rows = [s.singular_values[:, None] * s.components for s in live]
    rows.append(torch.stack([math.sqrt(s.n_samples) * d for s, d in zip(live, deltas)]))
    between = sum(s.n_samples * d.square().sum() for s, d in zip(live, deltas))
    extras = torch.stack([between, torch.zeros_like(between)])
    base_total = sum(s.total_sq_dev for s in live)

    def finish(result) -> PCASketch:
        s, v, e = result
        return PCASketch(v, s, mean, n_total, base_total + e[0])

    return _job(torch.cat(rows), keep, omega_fn, extras), finish


def _job(m: torch.Tensor, keep: int, omega_fn, extras: torch.Tensor) -> SVDJob:
    s = keep + OVERSAMPLE
    omega = omega_fn(s) if m.shape[0] > s else None
    return SVDJob(m, keep, omega, extras)


def shared_omega(seed: int, in_features: int, s: int, shard_cols: Callable, device) -> torch.Tensor:
    """This rank's rows [I_i, s] of the full Gaussian test matrix [I, s] that every TP rank draws
    from the same seed, so the randomized SVD is the TP=1 one up to rounding."""
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(s, in_features, generator=g, dtype=F64)
    return shard_cols(full).T.contiguous().to(device)


def row_similarities(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], group, size: int) -> list[torch.Tensor]:
    """|cos| between matching rows of sharded component matrices (one [3, c] sum per layer)."""
    parts = [torch.stack([(a * b).sum(1), a.square().sum(1), b.square().sum(1)]) for a, b in pairs]
    _sum_(parts, group, size)
    out = []
    for p in parts:
        denom = (p[1] * p[2]).sqrt()
        out.append(torch.where(denom > 0, p[0].abs() / denom.clamp_min(1e-300), torch.zeros_like(denom)))
    return out


def sign_fix_sharded(comps: Sequence[torch.Tensor], global_index: Sequence[torch.Tensor], group,
                     size: int) -> list[torch.Tensor]:
    """PEFT's svd_flip on sharded rows: the entry of largest |v| (first in global order) > 0.

    One all-gather of (max |v|, its value, its global column) per row of every layer.
    """
    if not comps:
        return []
    local = []
    for v, idx in zip(comps, global_index):
        arg = v.abs().argmax(dim=1, keepdim=True) if v.shape[1] else torch.zeros(v.shape[0], 1, dtype=torch.long)
        val = v.gather(1, arg)[:, 0] if v.shape[1] else v.new_zeros(v.shape[0])
        local.append(torch.stack([val.abs(), val, idx.to(v.device)[arg[:, 0]].to(F64)], dim=1))
    gathered = torch.stack(_gather(torch.cat(local), group, size))  # [t, rows, 3]
    out, start = [], 0
    for v in comps:
        g = gathered[:, start:start + v.shape[0]]
        start += v.shape[0]
        best = g[..., 0].max(dim=0).values
        cand = torch.where(g[..., 0] == best, g[..., 2], torch.full_like(g[..., 2], math.inf))
        pick = cand.argmin(dim=0)
        sign = torch.sign(g[..., 1].gather(0, pick[None])[0])
        sign[sign == 0] = 1
        out.append(v * sign[:, None])
    return out


def sync_replicas_(tensors: Sequence[torch.Tensor], replicated_over_tp: Sequence[bool],
                   groups: ParallelGroups) -> None:
    """Make replicas bit-identical once at the end: every tensor from DP rank 0, then the
    TP-replicated ones from TP rank 0 (one broadcast each; a few ulps must not split replicas)."""
    _broadcast_(list(tensors), groups.dp_group, groups.dp_size)
    _broadcast_([t for t, rep in zip(tensors, replicated_over_tp) if rep], groups.tp_group, groups.tp_size)


def _broadcast_(tensors: list[torch.Tensor], group, size: int) -> None:
    if size == 1 or not tensors:
        return
    flat = C.broadcast_(torch.cat([t.reshape(-1).to(F64) for t in tensors]), 0, group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()

