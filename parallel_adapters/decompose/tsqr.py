"""Tall-skinny QR of a row-split matrix Y = [Y_1; ...; Y_t] (Y_i [m_i, k] on rank i of t).

    local:   Y_i = Q1_i R_i            Q1_i [m_i, j], R_i [j, k], j = min(m_i, k)
    wire:    all-gather of the R_i     t * j * k elements received per rank (nothing else)
    local:   [R_1; ...; R_t] = Q2 R    the same QR on every rank (identical inputs)
    local:   Q_i = Q1_i Q2[i]          this rank's rows of Q [m, k]

Signs: diag(R) >= 0 (the unique QR of a full-rank Y), so every TP size gives one Q and R.
Q has orthonormal columns even when Y is rank-deficient (products of Householder factors).
"""
from __future__ import annotations

import torch

from parallel_adapters.distributed import collectives


def positive_diagonal(q: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q D, D R) with D = sign(diag R) (0 read as +1): the QR whose R has a non-negative diagonal."""
    d = torch.sign(torch.diagonal(r))
    d = torch.where(d == 0, torch.ones_like(d), d)
    return q * d, r * d[:, None]


def tsqr(y_local: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """(this rank's rows of Q [m_i, k], R [k, k] on every rank) for Y split by rows over `group`.
    Needs m = sum m_i >= k (ValueError otherwise, naming the shapes)."""
    size = collectives.group_size(group)
    m_i, k = y_local.shape
    if m_i * size < k:
        raise ValueError(f"tsqr: {size} x {m_i} rows cannot hold {k} orthonormal columns")
    q1, r1 = torch.linalg.qr(y_local)
    if size == 1:
        return positive_diagonal(q1, r1)
    stacked = torch.cat(collectives.all_gather_tensor(r1.contiguous(), group))  # [t * j, k]
    q2, r = torch.linalg.qr(stacked)
    j, rank = r1.shape[0], collectives.group_rank(group)
    return positive_diagonal(q1 @ q2[rank * j:(rank + 1) * j], r)
