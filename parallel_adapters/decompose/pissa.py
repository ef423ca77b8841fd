"""PiSSA factors (PEFT's `pissa_init`) of a tensor-parallel weight, from this rank's shard only.

PEFT, on the whole W [O, I] in float32:  W = V diag(S) Uh (its names), S_r /= s,
    A = diag(sqrt(S_r)) Uh_r  [r, I],   B = V_r diag(sqrt(S_r))  [O, r],   W <- W - s B A.
Here, per host (t = TP size, the SVD by `svd.split_svd` on the split matrix M):

    host                W shard          M (rows split)     A                   B
    column, replicated  W_i [O/t, I]     W_i                replicated [r, I]   B_i [O/t, r]
    row                 W_i [O, I/t]     W_i^T              A_i [r, I/t]        replicated [O, r]

so each rank forms exactly the factor shards it keeps.  Traffic per layer (b sketch columns,
n = I for column hosts, O for row hosts): (iterations + 1) (n b + t b^2) elements received, plus
3 t r for the signs on a row host; never a block of W or of s B A.

Sign convention (PEFT's torch.linalg.svd has none that survives sharding): each singular pair is
signed so that the entry of largest magnitude of its right singular vector (a row of A, over W's
input features; ties: the lowest feature index) is positive.  Every TP size then gives one A and B.

Precision: float32 for float32 / float16 / bfloat16 weights (as PEFT), float64 for float64 ones.
"""
from __future__ import annotations

import torch

from parallel_adapters.decompose import svd
from parallel_adapters.distributed import collectives
from parallel_adapters.distributed.groups import GROUP_OF_ONE


def working_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype the decomposition runs in: float32 or wider (PEFT casts to float32)."""
    if weight_dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"a PiSSA/OLoRA initialisation needs a floating-point base weight, got {weight_dtype} "
                        "(dequantize it first; PEFT refuses it too)")
    return torch.promote_types(weight_dtype, torch.float32)


def pissa_factors(w_local: torch.Tensor, mode: str, r: int, scaling: float, niter: int | None,
                  generator: torch.Generator, in_index: torch.Tensor, group,
                  max_iters: int = svd.MAX_ITERS) -> tuple[torch.Tensor, torch.Tensor, svd.SplitSVD]:
    """(this rank's A, this rank's B, the SVD's report) in the working dtype.

    `mode`: the host's parallel mode ("column", "row", "replicated"); `niter`: None for "pissa",
    K for "pissa_niter_K"; `generator`: seeded alike on every rank (draws the start sketch over the
    unsplit dimension, so every TP size draws the same one); `in_index` [I/t]: the global input
    feature of each local column of W (a row host's tie-breaking order); `group`: the TP group."""
    dtype = working_dtype(w_local.dtype)
    row = mode == "row"
    m_local = (w_local.T if row else w_local).to(dtype)
    b = svd.block_size(r, m_local.shape[0] * collectives.group_size(group), m_local.shape[1], niter)
    omega = torch.randn(m_local.shape[1], b, generator=generator, dtype=torch.float64).to(m_local.device, dtype)
    result = svd.split_svd(m_local, r, omega, group, niter, max_iters)
    u_local, v = result.u_local, result.v
    if row:  # W = V S U^T: W's right singular vectors are M's left ones (split over TP)
        signs = svd.largest_entry_signs(u_local, in_index, group)
    else:    # W = U S V^T: W's right singular vectors are M's right ones (replicated)
        signs = svd.largest_entry_signs(v, torch.arange(v.shape[0], device=v.device), GROUP_OF_ONE)
    u_local, v = u_local * signs, v * signs
    root = (result.s / scaling).sqrt()
    if row:
        return root[:, None] * u_local.T, v * root, result
    return root[:, None] * v.T, u_local * root, result

