"""Truncated SVD of a low-rank product M = B A whose one factor is split over TP, without forming M
(PEFT's `add_weighted_adapter(combination_type="svd")` on sharded LoRA factors).

Legend: B [O, R], A [R, I], R = sum of the combined ranks, k the kept rank, t the group size.

    B = Q_b R_b           Q_b [O, R], R_b [R, R]   tsqr when B is split by rows (column host), else local
    A^T = Q_a R_a         Q_a [I, R], R_a [R, R]   tsqr when A is split by columns (row host), else local
    R_b R_a^T = U S V^T   [R, R]                   local, identical on every rank
    M = (Q_b U) S (Q_a V)^T                        exact: M's SVD, each rank forming only its rows

Traffic: one all-gather of t [R, R] triangles (the split factor's TSQR), plus 3 t k numbers for the
signs on a row host; never a block of M.  Signs: each singular pair is signed so that the entry of
largest magnitude of its right singular vector (a row of the new A; ties: the lowest input feature)
is positive, as `decompose/pissa.py`, so every TP size gives one answer.
"""
from __future__ import annotations

import torch

from parallel_adapters.decompose.svd import largest_entry_signs
from parallel_adapters.decompose.tsqr import positive_diagonal, tsqr
from parallel_adapters.distributed import collectives
from parallel_adapters.distributed.groups import GROUP_OF_ONE


def _qr(x: torch.Tensor, split: bool, group) -> tuple[torch.Tensor, torch.Tensor]:
    if split:
        return tsqr(x, group)
    return positive_diagonal(*torch.linalg.qr(x))


def product_svd(b: torch.Tensor, a: torch.Tensor, k: int, split: str | None, in_index: torch.Tensor, group,
                driver: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(new A [k, I(/t)], new B [O(/t), k]) with B_new A_new = the rank-k truncated SVD of B A
    (B_new = U_k S_k, A_new = V_k^T, as PEFT).  `split`: "b" (B's rows split: column host), "a"
    (A's columns split: row host) or None (both whole); `in_index`: the global input feature of
    each local column of A.  Columns beyond the product's rank R are zeros."""
    size = collectives.group_size(group) if split else 1
    for name, factor, rows in (("B", b, b.shape[0]), ("A^T", a.T, a.shape[1])):
        total = rows * (size if split == name[0].lower() else 1)
        if total < factor.shape[1]:
            raise ValueError(f"combined rank {factor.shape[1]} exceeds the {total} rows of {name}: "
                             "combine fewer adapters or use combination_type='linear'")
    q_b, r_b = _qr(b, split == "b", group)
    q_a, r_a = _qr(a.T, split == "a", group)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False, driver=driver)
    kept = min(k, s.shape[0])
    b_new = q_b @ (u[:, :kept] * s[:kept])
    a_new_t = q_a @ vh[:kept].T  # [I(/t), kept]
    signs = largest_entry_signs(a_new_t, in_index, group if split == "a" else GROUP_OF_ONE)
    a_new, b_new = (a_new_t * signs).T, b_new * signs
    if kept < k:
        a_new = torch.cat([a_new, a_new.new_zeros(k - kept, a_new.shape[1])])
        b_new = torch.cat([b_new, b_new.new_zeros(b_new.shape[0], k - kept)], dim=1)
    return a_new.contiguous(), b_new.contiguous()


def quantile_clamp(a: torch.Tensor, b: torch.Tensor, q: float, split: str | None,
                   group) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's `svd_clamp`: h = the q-quantile of all entries of B and A together (torch.quantile,
    linear interpolation), then both clamped to [-h, h].  Exact: the split factor's entries are
    all-gathered (one factor's size, O k or k I elements; never a block of B A)."""
    pieces = []
    for name, factor in (("b", b), ("a", a)):
        flat = factor.reshape(-1).contiguous()
        pieces.append(torch.cat(collectives.all_gather_tensor(flat, group)) if split == name else flat)
    high = torch.quantile(torch.cat(pieces), q)
    return a.clamp(-high, high), b.clamp(-high, high)
