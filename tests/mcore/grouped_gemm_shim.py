"""Test-only stand-in for the `grouped_gemm` package, so megatron's GroupedMLP builds and runs on
the CPU.  It replaces grouped_gemm's CUDA kernel `ops.gmm` with a plain torch reference (one
matmul per expert: the kernel's definition, not its speed); it is installed into megatron's
`grouped_gemm_util` by the test jobs only, never by the package.
"""
from __future__ import annotations

import types

import torch


def reference_gmm(a: torch.Tensor, b: torch.Tensor, batch_sizes: torch.Tensor, trans_b: bool = False) -> torch.Tensor:
    """grouped_gemm.ops.gmm: rows of `a` [T, k] sorted by group, batch_sizes [E] rows each, times
    b[e] [E, k, n] (or b[e]^T with trans_b) -> [T, n]."""
    out = [rows @ (b[e].t() if trans_b else b[e]) for e, rows in enumerate(a.split(batch_sizes.tolist()))]
    return torch.cat(out) if out else a.new_zeros(0, b.shape[1] if trans_b else b.shape[2])


def install() -> None:
    """Make megatron see a grouped_gemm whose gmm is `reference_gmm` (idempotent, per process)."""
    from megatron.core.transformer.moe import grouped_gemm_util as gg

    ops = types.SimpleNamespace(gmm=reference_gmm)
    gg.grouped_gemm = types.SimpleNamespace(ops=ops)
    gg.ops = ops
