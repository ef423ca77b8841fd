"""OLoRA factors (PEFT's `olora_init`) of a tensor-parallel weight, from this rank's shard only.

PEFT, on the whole W [O, I] in float32:  W = Q R (reduced QR),  A = R[:r] [r, I],
B = Q[:, :r] [O, r],  W <- W - s B A  (no division by s, unlike PiSSA).  Q[:, :r] is an orthonormal
basis of W's first r columns C = W[:, :r] and R[:r] = Q[:, :r]^T W, so only C needs a QR:

    host                C = W[:, :r]                             B                     A
    column, replicated  rows split: C_i = W_i[:, :r];            Q_i [O/t, r] (local)  sum_i Q_i^T W_i: ONE
                        tsqr (all-gather of t [r, r] R's)                              all-reduce of r I
    row                 columns of whichever ranks own global    Q [O, r], local QR    Q^T W_i [r, I/t]
                        inputs < r: ONE all-reduce of O r        (replicated)          (local)
                        (each owner writes its columns, others 0)

Traffic per layer: t r^2 + r I (column) or O r (row) elements; never a block of W or of s B A.
Sign convention: diag(R) >= 0, i.e. A[j, j] >= 0 (the unique QR when C has full rank);
torch.linalg.qr's signs are LAPACK's, so PEFT's factors equal ours up to the signs of the pairs
(B[:, j], A[j]).  Precision: float32 for float32 / float16 / bfloat16 weights (as PEFT), float64
for float64 ones.
"""
from __future__ import annotations

import torch

from parallel_adapters.decompose.pissa import working_dtype
from parallel_adapters.decompose.tsqr import positive_diagonal, tsqr
from parallel_adapters.distributed import collectives


def olora_factors(w_local: torch.Tensor, mode: str, r: int, in_index: torch.Tensor,
                  group) -> tuple[torch.Tensor, torch.Tensor]:
    """(this rank's A, this rank's B) in the working dtype.  `mode`: the host's parallel mode;
    `in_index` [I/t]: the global input feature of each local column of W; `group`: the TP group."""
    w = w_local.to(working_dtype(w_local.dtype))
    if mode != "row":
        q_local, _ = tsqr(w[:, :r], group)
        a = collectives.all_reduce_((q_local.T @ w).contiguous(), group)
        return a, q_local
    first = torch.zeros(w.shape[0], r, dtype=w.dtype, device=w.device)
    mine = in_index < r
    first[:, in_index[mine]] = w[:, mine]
    collectives.all_reduce_(first, group)  # adding zeros is exact: every rank gets W[:, :r]
    q, _ = positive_diagonal(*torch.linalg.qr(first))
    return q.T @ w, q
