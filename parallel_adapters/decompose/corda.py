"""CorDA factors (PEFT's `preprocess_corda` + `corda_init`) of a tensor-parallel weight, from this
rank's weight shard and this rank's part of the input covariance C [I, I] (eva/corda_stats.py).

PEFT, on the whole W [O, I] in float32:  F = C + d I (d = mean(diag C) * damp, damp doubled from
0.01 until ||F F^-1 - I||_F < 0.05),  W F = U diag(S) Vh,  V = F^-1 Vh^T;  IPM keeps the top r
triplets, KPM the last r of min(O, I);  S /= s,  A = sqrt(S) V^T,  B = U sqrt(S),  W <- W - s B A.
Here M = W F, or its transpose, is a row-split matrix that `svd.split_svd` decomposes:

    host                C held           M (rows split)            A                 B
    column, replicated  whole (TP-same)  W_i F  [O/t, I]  local    replicated [r, I] B_i [O/t, r]
    row                 rows C_i [I/t,I] F W^T  [I/t, O]  never    A_i [r, I/t]      replicated [O, r]
                                         formed: an operator

Row host: F^-1 needs the whole of C, so the rows are all-gathered once per layer (I^2 elements,
statistics, never a block of W), F and F^-1 computed identically on every rank, and only this
rank's rows kept.  M's products need no block of W either: M_i Omega = F_i (W^T Omega) takes one
all-gather of the [I, b] sketch W^T Omega (rank i contributes W_i^T Omega), and M^T Q =
sum_i W_i (F Q)_i one all-gather of Q [I, b] before split_svd's own all-reduce of [O, b].
IPM: split_svd's converging mode (top r).  KPM needs the bottom of the spectrum, out of a sketch's
reach: one pass with b = min(O, I) columns, whose range is M's (exact, and as much traffic as a
W-sized exchange of sketches, never of W).
Signs: the largest entry of each right singular vector of W F (ties: the lowest input feature) is
positive, as PiSSA's, so every TP size gives one adapter; PEFT keeps LAPACK's signs.
"""
from __future__ import annotations

import torch

from parallel_adapters.decompose import svd
from parallel_adapters.decompose.pissa import working_dtype
from parallel_adapters.distributed import collectives
from parallel_adapters.distributed.groups import GROUP_OF_ONE

METHODS = ("ipm", "kpm")


def damped_inverse(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(F, F^-1) of a whole covariance, by PEFT's damping rule (module docstring)."""
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    damp, mean = 0.01, torch.diagonal(cov).mean()
    while True:
        fixed = cov + eye * (mean * damp)
        inverse = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inverse, eye).item() < 0.05:
            return fixed, inverse
        damp *= 2


class _RowHostProduct:
    """M = F W^T [I, O] split by rows over TP (rank i: F_i W^T), for `split_svd`; never formed."""

    def __init__(self, f_rows: torch.Tensor, w_local: torch.Tensor, group):
        self.f_rows, self.w, self.group = f_rows, w_local, group
        self.dtype = w_local.dtype

    def __matmul__(self, omega: torch.Tensor) -> torch.Tensor:  # M_i Omega = F_i (W^T Omega)
        return self.f_rows @ _gather_rows(self.w.T @ omega, self.group)

    @property
    def T(self) -> "_RowHostProductT":
        return _RowHostProductT(self)


class _RowHostProductT:
    def __init__(self, product: _RowHostProduct):
        self.p = product

    def __matmul__(self, q_local: torch.Tensor) -> torch.Tensor:  # this rank's addend of W F Q: W_i (F Q)_i
        return self.p.w @ (self.p.f_rows @ _gather_rows(q_local, self.p.group))


def _gather_rows(x: torch.Tensor, group) -> torch.Tensor:
    if collectives.group_size(group) == 1:
        return x
    return torch.cat(collectives.all_gather_tensor(x.contiguous(), group))


def corda_eigens(w_local: torch.Tensor, cov_local: torch.Tensor, mode: str, r: int, method: str,
                 generator: torch.Generator, in_index: torch.Tensor, group
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, svd.SplitSVD]:
    """(S [r], U shard, V shard, the SVD's report): PEFT's cropped `CordaEigens` with our signs, in
    the working dtype.  U is sharded like B (column host: rows [O/t, r]; else whole [O, r]), V like
    A^T (row host: rows [I/t, r]; else whole [I, r]).  `cov_local`: the whole C (column,
    replicated) or this rank's rows of C in rank-major feature order (row); `in_index`: the global
    input feature of each local column of W; `generator`: seeded alike on every rank."""
    if method not in METHODS:
        raise ValueError(f"CordaConfig.corda_method must be 'ipm' or 'kpm', got {method!r}")
    dtype = working_dtype(w_local.dtype)
    w, cov = w_local.to(dtype), cov_local.to(dtype)
    row = mode == "row"
    if row:
        fixed, inverse = damped_inverse(_gather_rows(cov, group))
        mine = slice(collectives.group_rank(group) * w.shape[1], (collectives.group_rank(group) + 1) * w.shape[1])
        fixed, inverse = fixed[mine], inverse[mine]
        m, shape = _RowHostProduct(fixed, w, group), (w.shape[1] * collectives.group_size(group), w.shape[0])
    else:
        fixed, inverse = damped_inverse(cov)
        m, shape = w @ fixed, (w.shape[0] * collectives.group_size(group), w.shape[1])
    full = min(shape)
    if r > full:
        raise ValueError(f"CorDA: r={r} exceeds min(out_features, in_features)={full}")
    niter, k = (None, r) if method == "ipm" else (0, full)
    b = svd.block_size(k, shape[0], shape[1], niter) if method == "ipm" else full
    omega = torch.randn(shape[1], b, generator=generator, dtype=torch.float64).to(w.device, dtype)
    result = svd.split_svd(m, k, omega, group, niter)
    keep = slice(0, r) if method == "ipm" else slice(full - r, full)
    u_local, v, s = result.u_local[:, keep], result.v[:, keep], result.s[keep]
    if row:  # W F = V S U^T: its right singular vectors are M's left ones (split over TP)
        signs = svd.largest_entry_signs(u_local, in_index, group)
        return s, v * signs, inverse @ _gather_rows(u_local * signs, group), result
    signs = svd.largest_entry_signs(v, torch.arange(v.shape[0], device=v.device), GROUP_OF_ONE)
    return s, u_local * signs, inverse @ (v * signs), result


def corda_factors(s: torch.Tensor, u: torch.Tensor, v: torch.Tensor, scaling: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's corda_init on eigens shards: (A = sqrt(S/s) V^T, B = U sqrt(S/s)), local."""
    root = (s / scaling).sqrt()
    return (root[:, None] * v.T).contiguous(), (u * root).contiguous()
