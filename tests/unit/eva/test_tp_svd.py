"""EVA's batched randomized SVD (eva/tp_svd.py) in one process (a group of one), float64, against
torch.linalg.svd and against the incremental PCA of eva/statistics.py (itself tested against a
full SVD and PEFT).  The TP-split path runs on real gloo ranks in tests/distributed."""
from __future__ import annotations

import pytest
import torch

from parallel_adapters.eva import tp_svd
from parallel_adapters.eva.statistics import PCASketch, empty_sketch, merge, subspace_similarity, update
from parallel_adapters.eva.tp_svd import Gaussians, SVDJob, merge_job, update_job

F64 = torch.float64
I = 40


def low_rank(n: int, rank: int, seed: int, cols: int = I) -> torch.Tensor:
    """n x cols of rank `rank`, well separated singular values, a non-zero mean."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(cols, rank, generator=g, dtype=F64)).Q.T
    z = torch.randn(n, rank, generator=g, dtype=F64) * torch.tensor([2.0 ** -j for j in range(rank)], dtype=F64)
    return 10 * z @ basis + torch.randn(cols, generator=g, dtype=F64)


def gaussian_fn(gaussians: Gaussians, cols_in: int = I):
    return lambda cols: gaussians.get("test", cols_in, cols, None, lambda full: full, F64, "cpu")


def assert_rows_equal_up_to_sign(a: torch.Tensor, b: torch.Tensor, atol: float) -> None:
    signs = torch.sign((a * b).sum(dim=-1, keepdim=True))
    torch.testing.assert_close(a, b * signs, atol=atol, rtol=0)


def job(m: torch.Tensor, keep: int, test: torch.Tensor | None, niter: int = 0) -> SVDJob:
    return SVDJob([m], keep, test, torch.zeros(2, dtype=F64), niter)


@pytest.mark.parametrize("randomized", [False, True])
def test_tp_svd_of_a_low_rank_matrix_is_its_svd(randomized: bool):
    m = low_rank(60, 4, seed=0)
    m = m - m.mean(0)  # rank 4
    test = torch.randn(I, 16, dtype=F64, generator=torch.Generator().manual_seed(1)) if randomized else None
    (sv, v, _), = tp_svd.tp_svd([job(m, 6, test, niter=2)], None, 1)
    _, s_ref, vt_ref = torch.linalg.svd(m, full_matrices=False)
    torch.testing.assert_close(sv[:4], s_ref[:4], atol=1e-8, rtol=0)
    assert float(sv[4:].max()) < 1e-6 * float(sv[0])
    assert_rows_equal_up_to_sign(v[:4], vt_ref[:4], atol=1e-8)


def test_batching_changes_nothing_and_keeps_the_job_order():
    """Jobs of two shapes, interleaved: the same results as one call per job (up to rounding)."""
    g = torch.Generator().manual_seed(2)
    mats = [torch.randn(30, I, generator=g, dtype=F64), torch.randn(50, 24, generator=g, dtype=F64),
            torch.randn(30, I, generator=g, dtype=F64), torch.randn(50, 24, generator=g, dtype=F64)]
    tests = [torch.randn(m.shape[1], 12, generator=g, dtype=F64) for m in mats]
    jobs = [SVDJob([m[:10], m[10:]], 5, t, torch.tensor([float(i), 1.0], dtype=F64), 3)
            for i, (m, t) in enumerate(zip(mats, tests))]
    together = tp_svd.tp_svd(jobs, None, 1)
    for j, (sv, v, extras) in zip(jobs, together):
        (sv1, v1, extras1), = tp_svd.tp_svd([j], None, 1)
        torch.testing.assert_close(sv, sv1, atol=1e-10, rtol=0)
        torch.testing.assert_close(v, v1, atol=1e-10, rtol=0)
        torch.testing.assert_close(extras, extras1, atol=0, rtol=0)
    assert [float(e[0]) for _, _, e in together] == [0.0, 1.0, 2.0, 3.0]


def test_update_job_matches_the_incremental_pca_when_keep_covers_the_rank():
    x = low_rank(150, 5, seed=3)
    keep, gaussians = 8, Gaussians(0)
    ours, reference = None, empty_sketch(I, keep, F64)
    for chunk in x.split([50, 40, 60]):  # 50 rows: cold and randomized; then warm
        j, finish = update_job(ours, chunk, keep, gaussian_fn(gaussians), None if ours is None else ours.components)
        assert j.test is not None and j.niter == (tp_svd.POWER_ITERS if ours is None else tp_svd.WARM_POWER_ITERS)
        ours = finish(tp_svd.tp_svd([j], None, 1)[0])
        reference = update(reference, chunk, keep)
    assert ours.n_samples == reference.n_samples == 150
    torch.testing.assert_close(ours.mean, reference.mean, atol=1e-10, rtol=0)
    torch.testing.assert_close(ours.total_sq_dev, reference.total_sq_dev, atol=1e-8, rtol=1e-12)
    torch.testing.assert_close(ours.singular_values[:5], reference.singular_values[:5], atol=1e-8, rtol=0)
    assert_rows_equal_up_to_sign(ours.components[:5], reference.components[:5], atol=1e-8)


def test_merge_job_matches_merge():
    x = low_rank(120, 5, seed=4)
    parts = [update(empty_sketch(I, 8, F64), chunk, 8) for chunk in x.split([40, 50, 30])]
    state = merge(parts[:1], 8)
    j, finish = merge_job([state] + parts[1:], 8, gaussian_fn(Gaussians(0)), state.components, F64)
    ours = finish(tp_svd.tp_svd([j], None, 1)[0])
    reference = merge(parts, 8)
    assert ours.n_samples == 120
    torch.testing.assert_close(ours.mean, reference.mean, atol=1e-10, rtol=0)
    torch.testing.assert_close(ours.total_sq_dev, reference.total_sq_dev, atol=1e-8, rtol=1e-12)
    torch.testing.assert_close(ours.singular_values[:5], reference.singular_values[:5], atol=1e-8, rtol=0)
    assert subspace_similarity(ours.components[:5], reference.components[:5]) > 1 - 1e-12


def test_short_stacks_take_the_exact_gram():
    j, _ = update_job(None, low_rank(20, 3, seed=5), 8, gaussian_fn(Gaussians(0)), None)
    assert j.test is None  # 20 rows <= 2 * (8 + OVERSAMPLE)


def test_float32_rows_keep_float64_state_and_agree_with_float64():
    x = low_rank(200, 6, seed=6)
    states = {}
    for dtype in (F64, torch.float32):
        gaussians, state = Gaussians(0), None
        for chunk in x.split(100):
            fn = lambda cols: gaussians.get("t", I, cols, None, lambda f: f, dtype, "cpu")  # noqa: E731
            j, finish = update_job(state, chunk.to(dtype), 8, fn, None if state is None else state.components)
            state = finish(tp_svd.tp_svd([j], None, 1)[0])
        states[dtype] = state
    assert states[torch.float32].components.dtype == F64 and states[torch.float32].singular_values.dtype == F64
    assert subspace_similarity(states[torch.float32].components[:6], states[F64].components[:6]) > 1 - 1e-9
    torch.testing.assert_close(states[torch.float32].singular_values[:6], states[F64].singular_values[:6],
                               rtol=1e-5, atol=0)


def test_gaussians_are_shared_drawn_once_and_sharded_from_the_full_matrix():
    gaussians = Gaussians(3)
    full = gaussians.get("a", 12, 5, None, lambda f: f, F64, "cpu")
    assert full.shape == (12, 5)
    assert gaussians.get("a", 12, 5, None, lambda f: f, F64, "cpu") is full
    shard = gaussians.get("a", 12, 5, ("rank", 1), lambda f: f[:, 6:], F64, "cpu")
    torch.testing.assert_close(shard, full[6:], atol=0, rtol=0)
    assert not torch.equal(gaussians.get("b", 12, 5, None, lambda f: f, F64, "cpu"), full)
    torch.testing.assert_close(Gaussians(3).get("a", 12, 5, None, lambda f: f, F64, "cpu"), full, atol=0, rtol=0)


def test_share_from_owners_in_a_group_of_one_returns_the_values():
    values = [torch.ones(2, 3, dtype=F64), torch.arange(4, dtype=F64)]
    out = tp_svd.share_from_owners(values, [(2, 3), (4,)], None, 1)
    assert all(torch.equal(a, b) for a, b in zip(out, values))


def test_sketches_stay_pca_sketches():
    """The finish functions return PCASketch with `keep` rows."""
    j, finish = update_job(None, low_rank(64, 4, seed=7), 6, gaussian_fn(Gaussians(0)), None)
    out = finish(tp_svd.tp_svd([j], None, 1)[0])
    assert isinstance(out, PCASketch) and out.components.shape == (6, I) and out.singular_values.shape == (6,)
