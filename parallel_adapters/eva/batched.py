"""Batched dense algebra of EVA's randomized SVD (pure torch: no torch.distributed, no state).

EVA decomposes one small matrix per target layer and step.  Layers of one model mostly share a
few shapes (every linear_qkv input, every linear_fc2 input, ...), so the matrices are stacked by
shape and each phase of the range finder runs as one batched call per shape, and the partial
sums of all layers cross the wire in one buffer per phase (`tp_svd.tp_svd`).

Shape legend: b matrices in a stack, r rows of a stacked matrix M, w this rank's columns of M,
s columns of the test matrix (components kept + oversampling), k components kept.

Precision: the O(r*w*s) products run in the data's working dtype (float32 for float32 / bf16
activations: those carry no more digits, and the products are where the time goes); the Gram
matrix [s, s], its eigendecomposition and the components are float64, because the Gram squares
the condition number.
"""
from __future__ import annotations

from typing import Hashable, Sequence

import torch

F64 = torch.float64


def buckets(keys: Sequence[Hashable]) -> list[list[int]]:
    """Indices grouped by equal key, groups in order of first appearance (so every rank that sees
    the same keys in the same order forms the same groups)."""
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def orthonormal_columns(y: torch.Tensor) -> torch.Tensor:
    """[b, r, s] -> Q [b, r, s] with orthonormal columns spanning those of y (reduced QR)."""
    return torch.linalg.qr(y).Q


def power_step(m: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One subspace iteration, this rank's partial sum: M_i (M_i^T orth(Y)) [b, r, s].

    M_i^T Q is formed as (Q^T M_i)^T: the same product, but M is read row-major (1.7x faster
    than a transposed batched GEMM with MKL on CPU)."""
    return m @ project(m, y).mT


def project(m: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """B_i = Q^T M_i [b, s, w] with Q = orth(Y): this rank's columns of M in the found range."""
    return orthonormal_columns(y).mT @ m


def gram(b: torch.Tensor) -> torch.Tensor:
    """B_i B_i^T [b, s, s] in float64 (this rank's partial Gram; pass B in float64)."""
    return b @ b.mT


def solve_gram(keep: int, b: torch.Tensor, g: torch.Tensor, rel_tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values [b, keep] and this rank's right singular vectors [b, keep, w] of
    B = [B_1 | ... | B_t] (float64: this rank's B_i and the summed G = B B^T).

    G = U L U^T; s = sqrt(L) descending; V_i = diag(1/s) U^T B_i.  Values below rel_tol * s_max
    are 0 with a zero row (rank-deficient input); rows beyond min(keep, s) are zero padding.
    """
    evals, evecs = torch.linalg.eigh(g)
    evals, evecs = evals.flip(-1), evecs.flip(-1)
    k = min(keep, evals.shape[-1])
    sv = evals[..., :k].clamp_min(0).sqrt()
    floor = sv[..., :1] * rel_tol if k else sv
    live = sv > floor
    inv = torch.where(live, 1.0 / sv.clamp_min(1e-300), torch.zeros_like(sv))
    comps = (evecs[..., :k].mT @ b) * inv[..., None]
    sv = torch.where(live, sv, torch.zeros_like(sv))
    if k == keep:
        return sv, comps
    out_s = sv.new_zeros(*sv.shape[:-1], keep)
    out_v = comps.new_zeros(*comps.shape[:-2], keep, b.shape[-1])
    out_s[..., :k], out_v[..., :k, :] = sv, comps
    return out_s, out_v


def test_matrix(warm: torch.Tensor | None, gaussian: torch.Tensor, s: int) -> torch.Tensor:
    """The test matrix [w, s]: the previous components (their rows transposed, at most s) first,
    then Gaussian columns.  Starting the range finder at the last step's subspace is what lets a
    warm step use fewer power iterations than a cold one for the same accuracy."""
    if warm is None or warm.shape[0] == 0:
        return gaussian[:, :s]
    warm = warm[:s].to(gaussian.dtype)
    return torch.cat([warm.mT, gaussian[:, : s - warm.shape[0]]], dim=1)
