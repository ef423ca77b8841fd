"""SVD of column-split matrices M = [M_1 | ... | M_t] across tensor-parallel ranks (EVA), many at once.

Row-parallel layer inputs are feature shards; each TP rank ends with exactly its slice of the
right singular vectors.  Randomized range finder: Y = sum_i M_i Omega_i (all-reduced over TP,
[rows, s]), p power iterations, Q = orth(Y), B_i = Q^T M_i, Gram B B^T = sum_i B_i B_i^T
(all-reduced, [s, s]), eigendecomposition, V_i = S^-1 U^T B_i.  Any other layer runs the same
algorithm with a group of one, so TP=1 equals TP=t.  The test matrix Omega starts at the layer's
previous components (a warm start, see `batched.test_matrix`) plus shared Gaussian columns.

All jobs of one call are stacked by shape (`batched.buckets`) and every phase is one batched
call per shape and ONE all-reduce for all of them.  Precision: see `batched`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Hashable, Sequence

import torch

from parallel_adapters.adapters.functional import factor_seed
from parallel_adapters.distributed import collectives as C
from parallel_adapters.distributed.groups import ParallelGroups
from parallel_adapters.eva import batched
from parallel_adapters.eva.statistics import PCASketch

F64 = torch.float64
OVERSAMPLE = 10
"""Extra columns of the randomized range finder beyond the components kept."""
POWER_ITERS = 3
"""Subspace (power) iterations from a random start; each is one [n, s] all-reduce over TP."""
WARM_POWER_ITERS = 2
"""Subspace iterations from the previous step's components (6 products of M instead of 8).  On
the layer inputs of a random-init 135M Llama, 40 incremental steps agreed with exact SVDs as
closely as POWER_ITERS from a random start did (mean similarity of the 32 kept components
0.984-1.000 per layer either way); one warm iteration was measurably worse."""
_REL_TOL = 1e-7
"""Singular values below this fraction of the largest are treated as 0 (Gram precision)."""


def _sum_(tensors: Sequence[torch.Tensor], group, size: int) -> None:
    """Size-aware and coalesced: one all-reduce per dtype; a group of one is never touched."""
    if size == 1 or not tensors:
        return
    for dtype in sorted({t.dtype for t in tensors}, key=str):
        C.all_reduce_coalesced_([t for t in tensors if t.dtype == dtype], group)


def _gather(x: torch.Tensor, group, size: int) -> list[torch.Tensor]:
    return [x] if size == 1 else C.all_gather_tensor(x, group)


# ----------------------------------------------------------------------------------------------
# SVD of column-split matrices: row-parallel inputs over TP; any other
# layer's rows with a group of one (the same randomized algorithm, so TP=1 equals TP=t)
# ----------------------------------------------------------------------------------------------

@dataclass
class SVDJob:
    """One matrix: this rank's column block M_i [rows, w] (working dtype) given as its row
    `blocks` (concatenated once, straight into the stack of its shape); `test` this rank's rows
    of the test matrix [w, s] (None: rows <= 2s, exact via the [rows, rows] Gram); `niter` power
    iterations; `extras` [2] float64 partial sums that ride along with the Gram all-reduce."""

    blocks: list[torch.Tensor]
    keep: int
    test: torch.Tensor | None
    extras: torch.Tensor
    niter: int = 0

    @property
    def shape(self) -> tuple[int, int]:
        return sum(b.shape[0] for b in self.blocks), self.blocks[0].shape[1]

    def key(self) -> Hashable:
        test = None if self.test is None else tuple(self.test.shape)
        return self.shape, self.blocks[0].dtype, test, self.niter, self.keep


def tp_svd(jobs: Sequence[SVDJob], group, size: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per job (singular values [keep], this rank's right singular vectors [keep, w], summed
    extras), all float64.  Collective over `group`: every rank passes jobs of the same shapes in
    the same order; 1 + max(niter) all-reduces of the stacked [rows, s] sketches, then one of
    the Gram matrices and extras, whatever the number of jobs."""
    stacks = [_Stack([jobs[i] for i in idx], idx) for idx in batched.buckets([j.key() for j in jobs])]
    rand = [st for st in stacks if st.test is not None]
    ys = [st.m @ st.test for st in rand]
    _sum_(ys, group, size)
    for it in range(max((st.niter for st in rand), default=0)):
        live = [i for i, st in enumerate(rand) if st.niter > it]
        for i in live:
            ys[i] = batched.power_step(rand[i].m, ys[i])
        _sum_([ys[i] for i in live], group, size)
    projected = iter([batched.project(st.m, y) for st, y in zip(rand, ys)])
    bs = [(next(projected) if st.test is not None else st.m).to(F64) for st in stacks]
    grams = [batched.gram(b) for b in bs]
    extras = [st.extras for st in stacks]
    _sum_(grams + extras, group, size)
    out: list = [None] * len(jobs)
    for st, b, g, e in zip(stacks, bs, grams, extras):
        sv, v = batched.solve_gram(st.keep, b, g, _REL_TOL)
        for pos, i in enumerate(st.index):
            out[i] = (sv[pos], v[pos], e[pos])
    return out


class _Stack:
    """Jobs of one shape, stacked: m [b, rows, w], test [b, w, s] or None, extras [b, 2]."""

    def __init__(self, jobs: Sequence[SVDJob], index: list[int]):
        self.index, self.keep, self.niter = index, jobs[0].keep, jobs[0].niter
        first = jobs[0].blocks[0]
        if len(jobs) == 1 and len(jobs[0].blocks) == 1:
            self.m = first[None]
        else:
            self.m = torch.empty(len(jobs), *jobs[0].shape, dtype=first.dtype, device=first.device)
            for out, job in zip(self.m, jobs):
                torch.cat(job.blocks, dim=0, out=out)
        self.test = None if jobs[0].test is None else torch.stack([j.test for j in jobs])
        self.extras = torch.stack([j.extras.to(F64) for j in jobs])


class Gaussians:
    """Shared Gaussian test columns, drawn once per (tag, in_features, columns) from one seed and
    reused by every layer and step (as PEFT's EVA reuses seed 42): each TP rank keeps the rows of
    its features (`shard_key` names the slice), so TP=t draws exactly the TP=1 matrix."""

    def __init__(self, seed: int):
        self.seed = seed
        self._cache: dict[Hashable, torch.Tensor] = {}

    def get(self, tag: str, in_features: int, cols: int, shard_key: Hashable, shard_cols: Callable,
            dtype: torch.dtype, device) -> torch.Tensor:
        """This rank's rows [w, cols] of the [in_features, cols] Gaussian of `tag`."""
        key = (tag, in_features, cols, shard_key, dtype, str(device))
        if key not in self._cache:
            g = torch.Generator().manual_seed(factor_seed(self.seed, "eva", tag, str(in_features), str(cols)))
            full = torch.randn(cols, in_features, generator=g, dtype=F64)
            self._cache[key] = shard_cols(full).T.to(device=device, dtype=dtype).contiguous()
        return self._cache[key]


GaussianFn = Callable[[int], torch.Tensor]
"""cols -> this rank's rows [w, cols] of the layer's shared Gaussian test columns."""


def update_job(state: PCASketch | None, rows: torch.Tensor, keep: int, gaussian: GaussianFn,
               warm: torch.Tensor | None) -> tuple[SVDJob, Callable]:
    """statistics.update on (a feature shard of) new rows [n, w] (their dtype is the working
    dtype): the stacked matrix of PEFT's partial_fit, split by columns; `warm` [k, w] starts the
    range finder.  Returns the job and `finish(result) -> PCASketch` (this rank's mean and
    components, the global total)."""
    n_new = rows.shape[0]
    batch_mean = rows.mean(dim=0)
    centered = rows - batch_mean
    flat = centered.reshape(-1)
    batch_sq = torch.dot(flat, flat).to(F64)
    batch_mean = batch_mean.to(F64)
    if state is None or state.n_samples == 0:
        m, n_old = [centered], 0
        extras = torch.stack([batch_sq, batch_sq.new_zeros(())])
        mean = batch_mean
    else:
        n_old = state.n_samples
        diff = state.mean - batch_mean
        factor = math.sqrt(n_old * n_new / (n_old + n_new))
        head = (state.singular_values[:, None] * state.components).to(rows.dtype)
        m = [head, centered, (factor * diff[None]).to(rows.dtype)]
        extras = torch.stack([batch_sq, diff.square().sum()])
        mean = (state.mean * n_old + batch_mean * n_new) / (n_old + n_new)
    n_total = n_old + n_new

    def finish(result) -> PCASketch:
        s, v, e = result
        total = e[0] + (n_old * n_new / n_total) * e[1]
        if state is not None and state.n_samples:
            total = total + state.total_sq_dev
        return PCASketch(v, s, mean, n_total, total)

    return _job(m, keep, extras, gaussian, warm), finish


def merge_job(sketches: Sequence[PCASketch], keep: int, gaussian: GaussianFn, warm: torch.Tensor | None,
              dtype: torch.dtype) -> tuple[SVDJob, Callable]:
    """statistics.merge on feature shards (components and means are this rank's slices), the
    stacked matrix in `dtype`."""
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

    return _job([r.to(dtype) for r in rows], keep, extras, gaussian, warm), finish


def _job(blocks: list[torch.Tensor], keep: int, extras: torch.Tensor, gaussian: GaussianFn,
         warm: torch.Tensor | None) -> SVDJob:
    s = keep + OVERSAMPLE
    if sum(b.shape[0] for b in blocks) <= 2 * s:  # the exact [rows, rows] Gram is no dearer
        return SVDJob(blocks, keep, None, extras)
    warm = None if warm is None or warm.shape[0] == 0 else warm
    niter = POWER_ITERS if warm is None else WARM_POWER_ITERS
    return SVDJob(blocks, keep, batched.test_matrix(warm, gaussian(s), s), extras, niter)


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


def share_from_owners(values: Sequence[torch.Tensor | None], shapes: Sequence[tuple[int, ...]], group, size: int,
                      device=None) -> list[torch.Tensor]:
    """Tensors that one rank of `group` holds (None elsewhere) on every rank: ONE all-reduce of a
    float64 buffer on `device` where only the owner of each part writes (adding zeros is exact)."""
    if size == 1 or not shapes:
        return [v for v in values]
    numels = [math.prod(shape) for shape in shapes]
    flat = torch.zeros(sum(numels), dtype=F64, device=device)
    for part, v in zip(flat.split(numels), values):
        if v is not None:
            part.copy_(v.reshape(-1))
    C.all_reduce_(flat, group)
    return [part.view(shape) for part, shape in zip(flat.split(numels), shapes)]


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

