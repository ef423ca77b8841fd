"""Top-k SVD of a row-split matrix M = [M_1; ...; M_t] (M_i [m_i, n] on rank i; m = sum m_i),
by subspace iteration whose sketches are the only traffic (Halko et al. 2011, alg. 4.4, the
scheme of torch.svd_lowrank, which PEFT's "pissa_niter_K" calls).

Legend: b block size (sketch columns, b >= k), t = group size.  One iteration:

    Y_i = M_i Omega                 [m_i, b]  local
    Q_i, _ = tsqr(Y)                [m_i, b]  all-gather of t [b, b] R factors
    Z = M^T Q = sum_i M_i^T Q_i     [n, b]    ONE all-reduce of n * b elements
    Omega = orth(Z)                 [n, b]    local (Z is the same on every rank)

and at the end the Rayleigh-Ritz step Z^T = Q^T M = U_b S V^T ([b, n], local): M's top-k left
singular vectors are Q_i U_b (this rank's rows), the right ones V (replicated).  No rank ever
holds a block of M it does not own: per iteration a rank receives n b + t b^2 elements (plus a
one-element flag in the converging mode), i.e. O((m + n) b) for the whole run, never O(m n).

Two modes:
  niter=K     K iterations after the first sketch, b = k (as torch.svd_lowrank(q=k, niter=K)).
  niter=None  "exact": iterate until the top-k right Ritz subspace stops moving (distance between
              successive subspaces <= 16 eps sqrt(k), or stalled at the rounding floor below
              sqrt(eps)), b = k + min(max(8, k), 32) extra columns for a faster rate
              (sigma_{b+1} / sigma_k)^2 per iteration; at most `max_iters`.  It converges to the
              exact SVD's top-k triplets wherever they are defined (sigma_k > sigma_{k+1}).
              An exact SVD of the stacked TSQR factors would instead move min(m, t n) x n
              elements per rank: as much as W itself for any layer where m <= t n.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from parallel_adapters.decompose.tsqr import tsqr
from parallel_adapters.distributed import collectives

MAX_ITERS = 300
"""Cap on the converging mode's iterations (a warning names the layer when it is reached)."""


@dataclass(frozen=True)
class SplitSVD:
    """M ~ U diag(s) V^T: `u_local` this rank's rows [m_i, k], `s` [k], `v` [n, k] replicated."""

    u_local: torch.Tensor
    s: torch.Tensor
    v: torch.Tensor
    iterations: int
    converged: bool
    distance: float
    """The last distance between successive right subspaces (0.0 for niter=K)."""


def block_size(k: int, m: int, n: int, niter: int | None) -> int:
    """Sketch columns: k for niter=K (as PEFT); k + min(max(8, k), 32) for the exact mode; at most min(m, n)."""
    extra = 0 if niter is not None else min(max(8, k), 32)
    return min(k + extra, m, n)


def split_svd(m_local: torch.Tensor, k: int, omega: torch.Tensor, group, niter: int | None = None,
              max_iters: int = MAX_ITERS) -> SplitSVD:
    """Top-k SVD of the row-split M (module docstring); `omega` [n, b] the replicated start (b >= k,
    the same on every rank), in M's dtype.  Collective over `group`."""
    if omega.shape[1] < k:
        raise ValueError(f"split_svd: {omega.shape[1]} sketch columns cannot give {k} singular triplets")
    eps = torch.finfo(m_local.dtype).eps
    tol, floor = 16 * eps * math.sqrt(k), math.sqrt(eps)
    q, _ = tsqr(m_local @ omega, group)
    z = _sum(m_local.T @ q, group)
    prev_v, prev_d, d = None, math.inf, 0.0
    iterations, converged = 0, niter is not None
    while iterations < (niter if niter is not None else max_iters):
        if niter is None:
            v = torch.linalg.svd(z.T, full_matrices=False).Vh[:k].T
            if prev_v is not None:
                d = torch.linalg.matrix_norm(v - prev_v @ (prev_v.T @ v)).item()
                if collectives.all_ranks_agree(d <= tol or (d <= floor and d >= prev_d), group):
                    converged = True
                    break
                prev_d = d
            prev_v = v
        q, _ = tsqr(m_local @ torch.linalg.qr(z).Q, group)
        z = _sum(m_local.T @ q, group)
        iterations += 1
    u_b, s, vh = torch.linalg.svd(z.T, full_matrices=False)  # Q^T M = U_b diag(s) V^T
    return SplitSVD(q @ u_b[:, :k], s[:k], vh[:k].T, iterations, converged, d)


def largest_entry_signs(vectors_local: torch.Tensor, global_index: torch.Tensor, group) -> torch.Tensor:
    """Per column of a (row-split) [w, k] matrix of singular vectors: +1 or -1 so that the column's
    entry of largest magnitude (ties: the lowest global row) becomes positive.  One all-gather of
    3 k numbers per rank over `group` (the group of the split; a group of one for a whole matrix)."""
    mags, rows = vectors_local.abs().max(dim=0)  # first maximum within this rank
    local = torch.stack([mags, vectors_local.gather(0, rows[None])[0], global_index[rows].to(mags.dtype)])
    every = torch.stack(collectives.all_gather_tensor(local.contiguous(), group))  # [t, 3, k]
    best = every[:, 0].max(dim=0).values
    candidate = torch.where(every[:, 0] == best, every[:, 2], torch.full_like(every[:, 2], math.inf))
    owner = candidate.argmin(dim=0)
    value = every[:, 1].gather(0, owner[None])[0]
    return torch.where(value < 0, -torch.ones_like(value), torch.ones_like(value))


def _sum(x: torch.Tensor, group) -> torch.Tensor:
    return collectives.all_reduce_(x.contiguous(), group)
