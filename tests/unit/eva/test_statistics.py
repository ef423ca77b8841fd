"""EVA sketches: incremental update / merge vs full SVD and vs PEFT's IncrementalPCA (float64)."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from parallel_adapters.eva.statistics import (
    PCASketch,
    component_similarity,
    empty_sketch,
    explained_variance,
    explained_variance_ratio,
    has_converged,
    merge,
    subspace_similarity,
    update,
    whiten,
)

F64 = torch.float64
I = 8


def low_rank_data(n: int, rank: int, seed: int, noise: float = 0.0) -> torch.Tensor:
    """Centered rank `rank` (+ noise) with well-separated singular values and a non-zero mean."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(I, rank, generator=g, dtype=F64)).Q.T
    scales = torch.tensor([10.0 / (2**j) for j in range(rank)], dtype=F64)
    z = torch.randn(n, rank, generator=g, dtype=F64) * scales
    x = z @ basis + 3.0 + torch.randn(I, generator=g, dtype=F64)
    return x + noise * torch.randn(n, I, generator=g, dtype=F64)


def full_svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mean = x.mean(0)
    _, s, vt = torch.linalg.svd(x - mean, full_matrices=False)
    return mean, s, vt


def assert_rows_equal_up_to_sign(a: torch.Tensor, b: torch.Tensor, atol: float) -> None:
    signs = torch.sign((a * b).sum(dim=1, keepdim=True))
    torch.testing.assert_close(a, b * signs, atol=atol, rtol=0)


def sketch_of(x: torch.Tensor, q: int, batches: int | list[int] | None = None) -> PCASketch:
    sk = empty_sketch(I, q, F64)
    for chunk in torch.split(x, batches or x.shape[0]):
        sk = update(sk, chunk, q)
    return sk


def test_update_over_batches_matches_full_svd_when_q_covers_rank():
    x = low_rank_data(60, rank=3, seed=0)
    sk = sketch_of(x, q=5, batches=[10, 7, 20, 23])
    mean, s, vt = full_svd(x)
    assert sk.n_samples == 60 and sk.components.shape == (5, I)
    torch.testing.assert_close(sk.mean, mean, atol=1e-10, rtol=0)
    torch.testing.assert_close(sk.singular_values, s[:5], atol=1e-10, rtol=0)
    assert_rows_equal_up_to_sign(sk.components[:3], vt[:3], atol=1e-10)
    torch.testing.assert_close(sk.total_sq_dev, (x - mean).square().sum(), atol=1e-10, rtol=0)
    torch.testing.assert_close(sk.components @ sk.components.T, torch.eye(5, dtype=F64), atol=1e-10, rtol=0)


def test_update_truncation_loses_information():
    """Sanity check that the q >= rank test can fail: q < rank cannot be exact."""
    x = low_rank_data(60, rank=5, seed=1)
    sk = sketch_of(x, q=2, batches=[10, 50])
    _, s, _ = full_svd(x)
    assert sk.n_components == 2
    assert float(sk.singular_values.square().sum()) < float(s.square().sum()) - 1.0


def test_lowrank_update_is_exact_on_low_rank_data():
    x = low_rank_data(40, rank=3, seed=2)
    sk = empty_sketch(I, 3, F64)
    for chunk in torch.split(x, 10):
        sk = update(sk, chunk, 3, lowrank=True, seed=7)
    mean, s, vt = full_svd(x)
    torch.testing.assert_close(sk.singular_values, s[:3], atol=1e-9, rtol=0)
    assert_rows_equal_up_to_sign(sk.components, vt[:3], atol=1e-9)


def test_lowrank_seed_does_not_disturb_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    update(empty_sketch(I, 2, F64), low_rank_data(10, 3, seed=3), 2, lowrank=True, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_merge_of_disjoint_chunks_equals_sketch_of_all_data():
    x = low_rank_data(90, rank=3, seed=4)
    x[30:60] += 5.0  # chunks with different means exercise the between-chunk correction
    parts = [sketch_of(c, q=4, batches=11) for c in torch.split(x, [30, 30, 17, 13])]
    merged = merge(parts, q=4)
    mean, s, vt = full_svd(x)
    assert merged.n_samples == 90
    torch.testing.assert_close(merged.mean, mean, atol=1e-10, rtol=0)
    torch.testing.assert_close(merged.singular_values, s[:4], atol=1e-10, rtol=0)
    assert_rows_equal_up_to_sign(merged.components[:3], vt[:3], atol=1e-10)
    torch.testing.assert_close(merged.total_sq_dev, (x - mean).square().sum(), atol=1e-9, rtol=0)


def test_merge_truncated_sketches_keeps_dominant_subspace():
    x = low_rank_data(200, rank=3, seed=5, noise=1e-3)
    parts = [sketch_of(c, q=3, batches=20) for c in torch.split(x, 100)]
    merged = merge(parts, q=3)
    _, _, vt = full_svd(x)
    assert subspace_similarity(merged.components, vt[:3]) >= 0.999
    assert subspace_similarity(merged.components, vt[3:6]) < 0.01


def test_merge_is_order_independent_and_ignores_empty_sketches():
    x = low_rank_data(48, rank=4, seed=6, noise=0.1)
    parts = [sketch_of(c, q=3) for c in torch.split(x, [10, 20, 18])]
    ref = merge(parts, q=3)
    for perm in itertools.permutations(parts):
        got = merge([empty_sketch(I, 3, F64), *perm], q=3)
        torch.testing.assert_close(got.singular_values, ref.singular_values, atol=1e-12, rtol=0)
        torch.testing.assert_close(got.mean, ref.mean, atol=1e-12, rtol=0)
        assert_rows_equal_up_to_sign(got.components, ref.components, atol=1e-10)


def test_merge_tolerates_zero_padded_rows():
    x = low_rank_data(30, rank=2, seed=7)
    a, b = sketch_of(x[:15], q=2), sketch_of(x[15:], q=2)
    pad = PCASketch(
        torch.cat([a.components, torch.zeros(3, I, dtype=F64)]),
        torch.cat([a.singular_values, torch.zeros(3, dtype=F64)]),
        a.mean, a.n_samples, a.total_sq_dev,
    )
    torch.testing.assert_close(merge([pad, b], 2).singular_values, merge([a, b], 2).singular_values)


def test_explained_variance_matches_full_svd_formulas():
    x = low_rank_data(50, rank=6, seed=8)
    sk = sketch_of(x, q=3, batches=[50])
    mean, s, _ = full_svd(x)
    torch.testing.assert_close(explained_variance(sk), s[:3] ** 2 / 49, atol=1e-10, rtol=0)
    # sklearn: explained_variance_ / total variance (ddof=1) == S^2 / ||Xc||_F^2
    total_var = x.var(dim=0, unbiased=True).sum()
    torch.testing.assert_close(explained_variance_ratio(sk), s[:3] ** 2 / 49 / total_var, atol=1e-12, rtol=0)
    assert float(explained_variance_ratio(sk).sum()) < 1.0
    full = sketch_of(x, q=I)
    assert math.isclose(float(explained_variance_ratio(full).sum()), 1.0, abs_tol=1e-12)


@pytest.mark.parametrize("lowrank", [False, True])
@pytest.mark.parametrize("q", [2, 3, 6])
def test_update_matches_peft_incremental_pca(q: int, lowrank: bool):
    from peft.utils.incremental_pca import IncrementalPCA

    x = low_rank_data(70, rank=5, seed=9, noise=0.05)
    ipca = IncrementalPCA(n_components=q, lowrank=lowrank, lowrank_seed=42 if lowrank else None)
    sk = empty_sketch(I, q, F64)
    for chunk in torch.split(x, [12, 20, 8, 30]):
        ipca.partial_fit(chunk)
        sk = update(sk, chunk, q, lowrank=lowrank, seed=42)
        assert_rows_equal_up_to_sign(sk.components, ipca.components_, atol=1e-10)
        torch.testing.assert_close(sk.singular_values, ipca.singular_values_, atol=1e-10, rtol=0)
        torch.testing.assert_close(sk.mean, ipca.mean_, atol=1e-12, rtol=0)
        torch.testing.assert_close(explained_variance(sk), ipca.explained_variance_, atol=1e-10, rtol=0)
        torch.testing.assert_close(
            explained_variance_ratio(sk), ipca.explained_variance_ratio_, atol=1e-12, rtol=0
        )
    # same svd_flip convention, so even the signs agree (PEFT's signed convergence test relies on it)
    torch.testing.assert_close(sk.components, ipca.components_, atol=1e-10, rtol=0)


def givens(k: int, i: int, j: int, angle: float) -> torch.Tensor:
    g = torch.eye(k, dtype=F64)
    c, s = math.cos(angle), math.sin(angle)
    g[i, i], g[j, j], g[i, j], g[j, i] = c, c, -s, s
    return g


def test_convergence_identical_vs_rotated():
    comps = torch.linalg.qr(torch.randn(I, I, dtype=F64, generator=torch.Generator().manual_seed(0))).Q.T
    prev, cur = comps[:4], comps[:4].clone()
    assert has_converged(prev, cur, k=4, tau=0.99)
    torch.testing.assert_close(component_similarity(prev, cur, 4), torch.ones(4, dtype=F64))
    rotated = givens(I, 1, 6, 0.3) @ comps  # mixes component 1 with an unkept direction
    assert not has_converged(prev, rotated[:4], k=4, tau=0.99)
    assert has_converged(prev, rotated[:4], k=1, tau=0.99)  # only the first k (allocated rank) count
    sim = component_similarity(prev, rotated[:4], 4)
    assert math.isclose(float(sim[1]), math.cos(0.3), abs_tol=1e-12)


def test_convergence_sign_flip_edge_cases():
    comps = torch.eye(I, dtype=F64)[:3]
    flipped = comps * torch.tensor([[1.0], [-1.0], [1.0]], dtype=F64)
    assert has_converged(comps, flipped, 3, 0.99)
    assert not has_converged(comps, flipped, 3, 0.99, absolute=False)  # PEFT's signed test
    assert not has_converged(None, comps, 3, 0.99)
    assert has_converged(None, comps, 0, 0.99)  # torch.all(converged[:0]) is True in PEFT
    tau = torch.tensor([0.99, 0.99, 1.5], dtype=F64)  # per-component thresholds, as PEFT allows
    assert not has_converged(comps, comps, 3, tau)


def test_whiten_divides_by_sqrt_singular_values():
    comps = torch.eye(I, dtype=F64)[:3]
    s = torch.tensor([16.0, 4.0, 1.0], dtype=F64)
    w = whiten(comps, s, k=2)
    torch.testing.assert_close(w, torch.eye(I, dtype=F64)[:2] * torch.tensor([[0.25], [0.5]], dtype=F64))


def test_subspace_similarity_bounds():
    eye = torch.eye(I, dtype=F64)
    assert math.isclose(subspace_similarity(eye[:3], eye[[2, 0, 1]] * 2.0), 1.0, abs_tol=1e-12)
    assert subspace_similarity(eye[:3], eye[3:6]) < 1e-12
    assert math.isclose(subspace_similarity(eye[:2], eye[1:3]), 0.5, abs_tol=1e-12)
