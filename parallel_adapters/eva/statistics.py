"""Mergeable PCA sketches for EVA (pure torch, no torch.distributed, no globals).

A `PCASketch` summarises a data matrix X [n, I] by the top right singular vectors of the
*centered* data (X - mean), their singular values, the mean, the row count and the exact
total sum of squared deviations.  `update` is the sklearn/PEFT incremental-PCA step (the same
stacking, SVD and sign convention as `peft.utils.incremental_pca.IncrementalPCA.partial_fit`),
and `merge` combines sketches of *disjoint* data, e.g. the sketches of data-parallel ranks after
an all-gather, so raw activations never cross the wire.  Both are exact when q >= rank of the
centered data and otherwise the usual incremental-PCA approximation (truncation error only).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class PCASketch:
    """Summary of X [n, I]: Xc = X - mean ~= U diag(singular_values) components.

    components [q, I]: orthonormal rows, by descending singular value, sign-fixed as PEFT does.
    singular_values [q]: singular values of the centered data (not normalised by n).
    mean [I]: column mean.  n_samples: rows seen.
    total_sq_dev: 0-dim, ||X - mean||_F^2 over *all* directions (the explained-variance-ratio
    denominator; kept exactly, also for truncated q, as PEFT keeps the per-feature variance).
    Zero rows (singular value 0) are allowed, so padded sketches can be merged as they are.
    """

    components: torch.Tensor
    singular_values: torch.Tensor
    mean: torch.Tensor
    n_samples: int
    total_sq_dev: torch.Tensor

    @property
    def n_features(self) -> int:
        return int(self.mean.shape[0])

    @property
    def n_components(self) -> int:
        return int(self.singular_values.shape[0])


def empty_sketch(
    n_features: int, q: int = 0, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> PCASketch:
    """Sketch of zero rows; `q` is accepted for symmetry but an empty sketch keeps no components."""
    del q
    return PCASketch(
        components=torch.zeros(0, n_features, dtype=dtype, device=device),
        singular_values=torch.zeros(0, dtype=dtype, device=device),
        mean=torch.zeros(n_features, dtype=dtype, device=device),
        n_samples=0,
        total_sq_dev=torch.zeros((), dtype=dtype, device=device),
    )


def flip_signs(vt: torch.Tensor) -> torch.Tensor:
    """Make the largest-|.| entry of each row positive (sklearn svd_flip, u_based_decision=False)."""
    if vt.shape[0] == 0:
        return vt
    idx = torch.argmax(vt.abs(), dim=1)
    signs = torch.sign(vt.gather(1, idx[:, None]))
    signs[signs == 0] = 1
    return vt * signs


def _svd(
    a: torch.Tensor, lowrank: bool, lowrank_q: int | None, niter: int, seed: int | None, q: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values and sign-fixed right singular vectors (exact, or PEFT's randomized SVD)."""
    if not lowrank:
        _, s, vt = torch.linalg.svd(a, full_matrices=False)
        return s, flip_signs(vt)
    oversampled = 2 * q if lowrank_q is None else lowrank_q
    if oversampled < q:
        raise ValueError(f"lowrank_q={oversampled} must be >= q={q}")
    devices = [a.device] if a.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        _, s, v = torch.svd_lowrank(a, q=oversampled, niter=niter)
    return s, flip_signs(v.mH)


def _truncate(s: torch.Tensor, vt: torch.Tensor, q: int) -> tuple[torch.Tensor, torch.Tensor]:
    return s[:q].contiguous(), vt[:q].contiguous()


def update(
    sketch: PCASketch,
    X: torch.Tensor,
    q: int,
    *,
    lowrank: bool = False,
    lowrank_q: int | None = None,
    niter: int = 4,
    seed: int | None = None,
) -> PCASketch:
    """One incremental-PCA step with batch X [n, I]; keeps at most q components.

    Mirrors sklearn/PEFT partial_fit: SVD of [S*V ; X - batch_mean ; sqrt(n_old n_new / n) *
    (old_mean - batch_mean)] (first batch: just X - mean).  `lowrank=True` uses
    torch.svd_lowrank with `lowrank_q` (default 2q) and `niter` like PEFT's EVA hook (which
    uses lowrank=True, seed=42); a `seed` makes it reproducible, the global RNG is restored.
    """
    X = X.to(dtype=sketch.mean.dtype, device=sketch.mean.device)
    if X.ndim != 2 or X.shape[1] != sketch.n_features:
        raise ValueError(f"expected X [n, {sketch.n_features}], got {tuple(X.shape)}")
    n_new = int(X.shape[0])
    if n_new == 0:
        return sketch
    n_old, n_total = sketch.n_samples, sketch.n_samples + n_new
    batch_mean = X.sum(dim=0) / n_new
    centered = X - batch_mean
    batch_sq_dev = centered.square().sum()
    mean = (sketch.mean * n_old + X.sum(dim=0)) / n_total
    if n_old == 0:
        stacked, total_sq_dev = centered, batch_sq_dev
    else:
        diff = sketch.mean - batch_mean
        factor = math.sqrt(n_old * n_new / n_total)
        rows = [sketch.singular_values[:, None] * sketch.components, centered, (factor * diff)[None]]
        stacked = torch.cat(rows, dim=0)
        total_sq_dev = sketch.total_sq_dev + batch_sq_dev + (n_old * n_new / n_total) * diff.square().sum()
    s, vt = _svd(stacked, lowrank, lowrank_q, niter, seed, q)
    s, vt = _truncate(s, vt, q)
    return PCASketch(vt, s, mean, n_total, total_sq_dev)


def merge(sketches: Sequence[PCASketch], q: int) -> PCASketch:
    """Sketch of the union of the disjoint data behind `sketches` (e.g. one per DP rank).

    SVD of [S_i*V_i for each i ; sqrt(n_i) (mean_i - mean) for each i]: its Gram matrix is the
    within-sketch scatter plus the exact between-sketch scatter, so the result is exact when every
    input is, and independent of input order (same rows permuted; signs are fixed afterwards).
    """
    live = [s for s in sketches if s.n_samples > 0]
    if not sketches:
        raise ValueError("merge needs at least one sketch")
    if not live:
        return sketches[0]
    n_total = sum(s.n_samples for s in live)
    mean = sum(s.mean * (s.n_samples / n_total) for s in live)
    scaled = [s.singular_values[:, None] * s.components for s in live]
    corrections = [math.sqrt(s.n_samples) * (s.mean - mean) for s in live]
    stacked = torch.cat(scaled + [torch.stack(corrections)], dim=0)
    between = sum(s.n_samples * (s.mean - mean).square().sum() for s in live)
    total_sq_dev = sum(s.total_sq_dev for s in live) + between
    sv, vt = _svd(stacked, False, None, 0, None, q)
    sv, vt = _truncate(sv, vt, q)
    return PCASketch(vt, sv, mean, n_total, total_sq_dev)


def explained_variance(sketch: PCASketch) -> torch.Tensor:
    """S^2 / (n - 1), sklearn's `explained_variance_` (zeros when n < 2)."""
    if sketch.n_samples < 2:
        return torch.zeros_like(sketch.singular_values)
    return sketch.singular_values.square() / (sketch.n_samples - 1)


def explained_variance_ratio(sketch: PCASketch) -> torch.Tensor:
    """S^2 / ||X - mean||_F^2, PEFT/sklearn `explained_variance_ratio_` (what EVA ranks by).

    The denominator is the total variance over all directions, not just the kept q, so the
    ratios of a truncated sketch sum to < 1 and are comparable across layers.
    """
    if float(sketch.total_sq_dev) <= 0.0:
        return torch.zeros_like(sketch.singular_values)
    return sketch.singular_values.square() / sketch.total_sq_dev


def component_similarity(
    prev_components: torch.Tensor, components: torch.Tensor, k: int, *, absolute: bool = True
) -> torch.Tensor:
    """Row-wise cosine similarity of the first k components [k].

    PEFT compares components_ of consecutive steps with signed torch cosine_similarity; signs are
    fixed by svd_flip so signed == absolute except when the flip flips.  `absolute=True` (default)
    ignores such pure sign flips; `absolute=False` reproduces PEFT exactly.
    """
    a, b = prev_components[:k], components[:k]
    if a.shape != b.shape:
        raise ValueError(f"need >= {k} components in both, got {tuple(a.shape)} and {tuple(b.shape)}")
    sim = torch.nn.functional.cosine_similarity(b, a, dim=1)
    return sim.abs() if absolute else sim


def has_converged(
    prev: torch.Tensor | None,
    cur: torch.Tensor,
    k: int,
    tau: float | torch.Tensor,
    *,
    absolute: bool = True,
) -> bool:
    """PEFT's layer test: all of the first k components have similarity >= tau.

    k is the layer's currently allocated rank; k == 0 is converged (torch.all of nothing), and
    with no previous step (prev None) anything else is not.
    """
    if k <= 0:
        return True
    if prev is None:
        return False
    sim = component_similarity(prev, cur, k, absolute=absolute)
    return bool(torch.all(sim >= tau))


def whiten(components: torch.Tensor, singular_values: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """PEFT's EVA whitening: first k components divided row-wise by sqrt(singular value).

    Note PEFT uses the raw (un-normalised) singular values, so the scale depends on n_samples.
    """
    k = components.shape[0] if k is None else k
    return components[:k] / singular_values[:k].sqrt()[:, None]


def subspace_similarity(U: torch.Tensor, V: torch.Tensor) -> float:
    """||Q_U Q_V^T||_F^2 / max(k_U, k_V) for the row spaces of U [k_U, I], V [k_V, I]; in [0, 1].

    The mean squared cosine of the principal angles; 1 iff the row spaces coincide.  Rows are
    orthonormalised first, so any full-rank bases may be passed.
    """
    if U.shape[0] == 0 or V.shape[0] == 0:
        return float(U.shape[0] == V.shape[0])
    qu = torch.linalg.qr(U.mT).Q.mT
    qv = torch.linalg.qr(V.mT).Q.mT
    overlap = (qu @ qv.mT).square().sum()
    return float(overlap / max(U.shape[0], V.shape[0]))
