"""Batched per-expert LoRA for grouped-GEMM experts (adapters/grouped_experts.py).

Reference: the per-expert loop `scaling * x_e A_e^T B_e^T` over each expert's rows, float64,
with experts that get no row; gradients in x, A and B too.  Where CUDA and the grouped_gemm
package exist (megatron's GroupedMLP backend), the same addend from two grouped_gemm `gmm` calls.
"""
import pytest
import torch

from parallel_adapters.adapters.grouped_experts import (
    expert_row_index, grouped_gemm_unavailable_reason, grouped_lora_delta,
)

COUNTS = torch.tensor([3, 0, 5, 1])  # expert 1 gets no token


def _factors(experts=4, r=2, fin=6, fout=5, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(int(COUNTS.sum()), fin, generator=g, dtype=dtype)
    return x, torch.randn(experts, r, fin, generator=g, dtype=dtype), torch.randn(experts, fout, r, generator=g, dtype=dtype)


def _loop(x, counts, a, b, scaling):
    rows = torch.split(x, counts.tolist())
    return torch.cat([scaling * rows[e] @ a[e].T @ b[e].T for e in range(len(rows))])


def test_row_index():
    experts, position = expert_row_index(COUNTS, 9)
    assert experts.tolist() == [0, 0, 0, 2, 2, 2, 2, 2, 3]
    assert position.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0]
    with pytest.raises(ValueError, match="sums to 9 rows, the input has 8"):
        expert_row_index(COUNTS, 8)


def test_batched_delta_and_grads_match_the_per_expert_loop():
    x, a, b = _factors()
    leaves = [t.clone().requires_grad_(True) for t in (x, a, b)]
    ours = grouped_lora_delta(leaves[0], COUNTS, leaves[1], leaves[2], 0.5)
    torch.testing.assert_close(ours, _loop(x, COUNTS, a, b, 0.5), rtol=0, atol=1e-12)
    weight = torch.randn_like(ours)
    ours_grads = torch.autograd.grad((ours * weight).sum(), leaves)
    ref_leaves = [t.clone().requires_grad_(True) for t in (x, a, b)]
    ref_grads = torch.autograd.grad((_loop(ref_leaves[0], COUNTS, *ref_leaves[1:], 0.5) * weight).sum(), ref_leaves)
    for got, want in zip(ours_grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_no_rows_and_mismatched_shapes():
    _, a, b = _factors()
    assert grouped_lora_delta(torch.zeros(0, 6, dtype=torch.float64), torch.zeros(4, dtype=torch.long), a, b,
                              1.0).shape == (0, 5)
    with pytest.raises(ValueError, match="tokens_per_expert has 3 experts, the factors 4"):
        grouped_lora_delta(torch.zeros(9, 6, dtype=torch.float64), COUNTS[:3], a, b, 1.0)


@pytest.mark.skipif(grouped_gemm_unavailable_reason() is not None, reason=str(grouped_gemm_unavailable_reason()))
def test_matches_grouped_gemm_gmm():  # pragma: no cover - CUDA and grouped_gemm only
    from grouped_gemm import ops

    x, a, b = (t.to("cuda", torch.bfloat16) for t in _factors())
    low = ops.gmm(x, a.transpose(1, 2).contiguous(), COUNTS, trans_b=False)
    want = ops.gmm(low, b.transpose(1, 2).contiguous(), COUNTS, trans_b=False) * 0.5
    torch.testing.assert_close(grouped_lora_delta(x, COUNTS.cuda(), a, b, 0.5).float(), want.float(),
                               rtol=2e-2, atol=2e-2)
