"""Batched algebra of EVA's randomized SVD (eva/batched.py) against dense float64 references:
torch.linalg.svd of each matrix of the stack, and the plain matrix products."""
from __future__ import annotations

import pytest
import torch

from parallel_adapters.eva import batched

F64 = torch.float64


def stack(b: int, rows: int, cols: int, seed: int = 0, rank: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, rows, cols, generator=g, dtype=F64)
    if rank is not None:
        x = x[..., :rank] @ torch.randn(b, rank, cols, generator=g, dtype=F64)
    return x


def assert_rows_equal_up_to_sign(a: torch.Tensor, b: torch.Tensor, atol: float) -> None:
    signs = torch.sign((a * b).sum(dim=-1, keepdim=True))
    torch.testing.assert_close(a, b * signs, atol=atol, rtol=0)


def test_buckets_group_equal_keys_in_order_of_first_appearance():
    assert batched.buckets(["b", "a", "b", "c", "a"]) == [[0, 2], [1, 4], [3]]
    assert batched.buckets([]) == []


def test_projection_and_power_step_are_the_plain_products():
    m, y = stack(3, 20, 12, seed=1), stack(3, 20, 5, seed=2)
    q = torch.linalg.qr(y).Q
    torch.testing.assert_close(batched.orthonormal_columns(y).mT @ batched.orthonormal_columns(y),
                               torch.eye(5, dtype=F64).expand(3, 5, 5), atol=1e-12, rtol=0)
    torch.testing.assert_close(batched.project(m, y), q.mT @ m, atol=1e-12, rtol=0)
    torch.testing.assert_close(batched.power_step(m, y), m @ (m.mT @ q), atol=1e-10, rtol=0)
    torch.testing.assert_close(batched.gram(m), m @ m.mT, atol=1e-12, rtol=0)


@pytest.mark.parametrize("keep", [3, 6])
def test_solve_gram_gives_the_dense_svd(keep: int):
    b = stack(4, 6, 15, seed=3)
    sv, v = batched.solve_gram(keep, b, batched.gram(b), 1e-10)
    assert sv.shape == (4, keep) and v.shape == (4, keep, 15)
    for i in range(4):
        _, s_ref, vt_ref = torch.linalg.svd(b[i], full_matrices=False)
        torch.testing.assert_close(sv[i], s_ref[:keep], atol=1e-10, rtol=0)
        assert_rows_equal_up_to_sign(v[i], vt_ref[:keep], atol=1e-8)


def test_solve_gram_sums_column_blocks_like_tensor_parallel_ranks():
    """B = [B_1 | B_2]: the Gram is the sum of the blocks' Grams, each block gets its columns."""
    b = stack(2, 5, 12, seed=4)
    blocks = b.split([7, 5], dim=-1)
    g = sum(batched.gram(x) for x in blocks)
    sv, v = batched.solve_gram(4, b, g, 1e-10)
    for x, cols in zip(blocks, v.split([7, 5], dim=-1)):
        sv_i, v_i = batched.solve_gram(4, x, g, 1e-10)
        torch.testing.assert_close(sv_i, sv, atol=0, rtol=0)
        torch.testing.assert_close(v_i, cols, atol=1e-12, rtol=0)


def test_solve_gram_zeroes_the_null_space_and_pads_to_keep():
    b = stack(2, 6, 10, seed=5, rank=2)
    sv, v = batched.solve_gram(8, b, batched.gram(b), 1e-7)
    assert sv.shape == (2, 8) and v.shape == (2, 8, 10)
    assert bool((sv[:, :2] > 1.0).all()) and not sv[:, 2:].any() and not v[:, 2:].any()
    torch.testing.assert_close(v[:, :2] @ v[:, :2].mT, torch.eye(2, dtype=F64).expand(2, 2, 2), atol=1e-10, rtol=0)


def test_test_matrix_puts_the_warm_rows_first():
    gaussian = stack(1, 9, 7, seed=6)[0]
    warm = stack(1, 3, 9, seed=7)[0]
    t = batched.test_matrix(warm, gaussian, 7)
    assert t.shape == (9, 7)
    torch.testing.assert_close(t[:, :3], warm.T, atol=0, rtol=0)
    torch.testing.assert_close(t[:, 3:], gaussian[:, :4], atol=0, rtol=0)
    torch.testing.assert_close(batched.test_matrix(None, gaussian, 5), gaussian[:, :5], atol=0, rtol=0)
    torch.testing.assert_close(batched.test_matrix(warm[:0], gaussian, 5), gaussian[:, :5], atol=0, rtol=0)
    assert batched.test_matrix(stack(1, 9, 9, seed=8)[0], gaussian, 5).shape == (9, 5)  # at most s warm rows
