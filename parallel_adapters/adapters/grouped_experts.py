"""LoRA on grouped-GEMM experts (megatron's `GroupedMLP` / TE's grouped linear): the low-rank
addend of every local expert in one batched product, no Python loop over experts (pure math).

A grouped-GEMM MoE layer runs its experts on the dispatcher's permuted tokens `x` [T, in], sorted
by local expert (`tokens_per_expert` [E] rows each, in expert order), as one `gmm` per weight.  The
per-expert LoRA addend is, for the rows t of expert e, `scaling * x_t A_e^T B_e^T`.  Here the rows
are scattered into a zero-padded [E, C, in] block (C = the largest expert's row count), multiplied
by the stacked factors with two `bmm`s, and gathered back: the flops of the per-expert loop plus
the padding, differentiable in x, A and B.

Status: megatron-core 0.16.1's `GroupedMLP` asserts the `grouped_gemm` package in `__init__`,
supports bf16 only and calls its CUDA `gmm` kernels; `TEGroupedMLP` needs Transformer Engine.
`adapters/hosts/grouped.py` wraps GroupedMLP with it (tested on the CPU with a torch stand-in
for grouped_gemm's gmm); this function is tested against the per-expert loop
(tests/unit/adapters/test_grouped_experts.py), and against grouped_gemm's own `gmm` where that
package and CUDA exist.
"""
from __future__ import annotations

import torch


def expert_row_index(tokens_per_expert: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert of each row, position of the row within its expert's rows) for rows sorted by expert."""
    counts = tokens_per_expert.to(torch.long)
    experts = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    if experts.numel() != num_rows:
        raise ValueError(f"tokens_per_expert sums to {experts.numel()} rows, the input has {num_rows}")
    starts = torch.cumsum(counts, 0) - counts
    return experts, torch.arange(num_rows, device=counts.device) - starts[experts]


def grouped_lora_delta(x: torch.Tensor, tokens_per_expert: torch.Tensor, lora_a: torch.Tensor,
                       lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """scaling * x_t A_e^T B_e^T for every row t of expert e: x [T, in] sorted by expert,
    tokens_per_expert [E], lora_a [E, r, in], lora_b [E, out, r] -> [T, out]."""
    if lora_a.dim() != 3 or lora_b.dim() != 3 or lora_a.shape[0] != lora_b.shape[0]:
        raise ValueError(f"lora_a [E, r, in] and lora_b [E, out, r] expected, got {tuple(lora_a.shape)} and "
                         f"{tuple(lora_b.shape)}")
    if tokens_per_expert.numel() != lora_a.shape[0]:
        raise ValueError(f"tokens_per_expert has {tokens_per_expert.numel()} experts, the factors {lora_a.shape[0]}")
    num_experts = lora_a.shape[0]
    experts, position = expert_row_index(tokens_per_expert, x.shape[0])
    # one host sync, as grouped_gemm's own batch sizes; no rows: capacity 0, the factors stay in
    # the graph (zero gradients, not None: every expert-DP rank then reduces the same tensors)
    capacity = int(tokens_per_expert.max()) if x.shape[0] else 0
    padded = x.new_zeros(num_experts, capacity, x.shape[1]).index_put((experts, position), x)
    low = torch.bmm(padded, lora_a.transpose(1, 2))  # [E, C, r]
    out = torch.bmm(low, lora_b.transpose(1, 2))  # [E, C, out]
    return out[experts, position] * scaling


def grouped_gemm_unavailable_reason() -> str | None:
    """Why megatron's GroupedMLP cannot run here (None: it can)."""
    if not torch.cuda.is_available():
        return "no CUDA device (megatron's GroupedMLP runs grouped_gemm's CUDA kernels, bf16 only)"
    try:
        import grouped_gemm  # noqa: F401
    except ImportError:
        return "the grouped_gemm package is not installed (megatron's GroupedMLP asserts it)"
    return None
