"""Emulated tensor parallelism (one process, TP 1, 2, 4, 8 as threads: tests/harness/thread_group.py),
float64: every decomposition route of issue 11 on column and row shards against its TP=1 result
(the same pure function on the whole W with a group of one), within 1e-6.

Routes: PiSSA exact and "pissa_niter_2" (decompose/pissa.py), OLoRA (olora.py), CorDA IPM and KPM
(corda.py), LoftQ with 2 iterations (loftq.py), the "svd" combination of LoRA factors with and
without svd_clamp (lowrank.py), and the "_svd" combinations' SVD of a merged update (svd.split_svd
on a row-split update, as adapters/weighted.py calls it), ties / magnitude_prune global thresholds
and DARE masks (weighted_math.py).  Sequence parallelism does not reach these functions (it only
changes how the layer's input is collected): the real-rank tests cover it.

"No full matrix" on the exact routes: every rank's received elements stay within the bound each
module's docstring states, O((O + I) r') per layer.
"""
import pytest
import torch

from parallel_adapters.distributed.groups import GROUP_OF_ONE
from parallel_adapters.distributed.sharding import ShardSpec
from tests.distributed.test_decomposition_init import planted
from tests.harness.thread_group import ThreadGroup, emulated_collectives

TOL = 1e-6
R, SCALE = 3, 2.0
SHAPES = {"column": (48, 32), "row": (32, 48)}  # W [O, I]; O/8 and I/8 rows/columns per rank at TP 8
SIZES = [1, 2, 4, 8]


def _weight_spec(mode):
    return ShardSpec(dim=0 if mode == "column" else 1)


def _in_index(mode, in_f, rank, t):
    return (ShardSpec(dim=0) if mode == "row" else ShardSpec()).shard(torch.arange(in_f), rank, t)


def _run(t, fn):
    """fn(rank, group) on t emulated ranks, and on the whole problem with a group of one."""
    group = ThreadGroup(t)
    with emulated_collectives():
        results = group.run(lambda rank: fn(rank, group))
    return results, fn(0, GROUP_OF_ONE), group.received


def _check(results, reference, specs, t):
    for rank, got in enumerate(results):
        for name, (tensor, spec) in specs(got, reference).items():
            want = spec.shard(tensor, rank, t) if spec is not None else tensor
            err = (got[name] - want).abs().max().item()
            assert err < TOL, f"TP {t} rank {rank} {name}: {err}"


def _factor_specs(mode):
    """(A, B) split as on a host: column: B's rows; row: A's columns."""
    return (ShardSpec(dim=1), None) if mode == "row" else (None, ShardSpec(dim=0))


@pytest.mark.parametrize("t", SIZES)
@pytest.mark.parametrize("mode", ["column", "row"])
@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_pissa_and_olora_give_the_tp1_factors(mode, t, init):
    from parallel_adapters.decompose import olora, pissa, svd

    out_f, in_f = SHAPES[mode]
    w = planted(out_f, in_f)
    niter = 2 if init == "pissa_niter_2" else None

    def job(rank, group):
        size = 1 if group is GROUP_OF_ONE else t
        w_local = _weight_spec(mode).shard(w, rank, size) if size > 1 else w
        index = _in_index(mode, in_f, rank, size)
        if init == "olora":
            a, b = olora.olora_factors(w_local, mode, R, index, group)
            return {"A": a, "B": b, "iterations": 0}
        a, b, report = pissa.pissa_factors(w_local, mode, R, SCALE, niter, torch.Generator().manual_seed(3), index,
                                           group)
        return {"A": a, "B": b, "iterations": report.iterations}

    results, reference, received = _run(t, job)
    spec_a, spec_b = _factor_specs(mode)
    _check(results, reference, lambda got, ref: {"A": (ref["A"], spec_a), "B": (ref["B"], spec_b)}, t)
    n = in_f if mode == "column" else out_f  # M's unsplit dimension
    for rank, got in enumerate(results):
        if init == "olora":
            bound = t * R * R + R * in_f if mode == "column" else out_f * R
        else:
            b = svd.block_size(R, out_f if mode == "column" else in_f, n, niter)
            bound = (got["iterations"] + 1) * (n * b + t * b * b) + got["iterations"] + 3 * t * R
        assert sum(received[rank]) <= bound, (rank, sum(received[rank]), bound)


def _covariance(in_f):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(40, in_f, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2.0, in_f, dtype=torch.float64)
    return x.T @ x / 40


@pytest.mark.parametrize("t", SIZES)
@pytest.mark.parametrize("mode", ["column", "row"])
@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_corda_gives_the_tp1_eigens(mode, t, method):
    from parallel_adapters.decompose import corda

    out_f, in_f = SHAPES[mode]
    w, cov = planted(out_f, in_f), _covariance(in_f)

    def job(rank, group):
        size = 1 if group is GROUP_OF_ONE else t
        row_split = mode == "row" and size > 1
        w_local = _weight_spec(mode).shard(w, rank, size) if size > 1 else w
        cov_local = ShardSpec(dim=0).shard(cov, rank, size) if row_split else cov
        s, u, v, report = corda.corda_eigens(w_local, cov_local, mode, R, method, torch.Generator().manual_seed(3),
                                             _in_index(mode, in_f, rank, size), group)
        return {"S": s, "U": u, "V": v, "iterations": report.iterations}

    results, reference, received = _run(t, job)
    u_spec, v_spec = (ShardSpec(dim=0), None) if mode == "column" else (None, ShardSpec(dim=0))
    _check(results, reference, lambda got, ref: {"S": (ref["S"], None), "U": (ref["U"], u_spec),
                                                 "V": (ref["V"], v_spec)}, t)
    if method == "kpm":  # one full-width pass: the bottom of the spectrum is out of a sketch's reach
        return
    n, b = (in_f if mode == "column" else out_f), R + 8
    for rank, got in enumerate(results):
        per_pass = n * b + t * b * b + 1 + (2 * in_f * b if mode == "row" else 0)
        bound = (got["iterations"] + 1) * per_pass + 3 * t * R + (in_f * in_f + in_f * R if mode == "row" else 0)
        assert sum(received[rank]) <= bound, (rank, sum(received[rank]), bound)


@pytest.mark.parametrize("t", SIZES)
@pytest.mark.parametrize("mode", ["column", "row"])
def test_loftq_gives_the_tp1_factors_and_base(mode, t):
    from parallel_adapters.decompose import loftq
    from tests.distributed.test_loftq_init import _weight

    out_f, in_f = SHAPES[mode]
    w, block, iters = _weight(out_f, in_f), 6, 2  # blocks of 6 never straddle a shard at TP <= 8 here

    def job(rank, group):
        size = 1 if group is GROUP_OF_ONE else t
        w_local = _weight_spec(mode).shard(w, rank, size) if size > 1 else w
        res = loftq.loftq_factors(w_local, mode, R, 4, iters, torch.Generator().manual_seed(3),
                                  _in_index(mode, in_f, rank, size), group, block_size=block)
        return {"A": res.a, "B": res.b, "Q": res.q, "iterations": res.iterations}

    results, reference, received = _run(t, job)
    spec_a, spec_b = _factor_specs(mode)
    _check(results, reference, lambda got, ref: {"A": (ref["A"], spec_a), "B": (ref["B"], spec_b),
                                                 "Q": (ref["Q"], _weight_spec(mode))}, t)
    n = in_f if mode == "column" else out_f
    b = R + 8
    for rank, got in enumerate(results):
        bound = (got["iterations"] + iters) * (n * b + t * b * b) + got["iterations"] + iters * 3 * t * R
        assert sum(received[rank]) <= bound, (rank, sum(received[rank]), bound)


@pytest.mark.parametrize("t", SIZES)
@pytest.mark.parametrize("mode", ["column", "row"])
@pytest.mark.parametrize("clamp", [None, 0.9])
def test_svd_combination_gives_the_tp1_factors(mode, t, clamp):
    """combination_type="svd": the truncated SVD of B A (R = 7 stacked ranks, k = 5) without forming it."""
    from parallel_adapters.decompose import lowrank

    out_f, in_f = SHAPES[mode]
    g = torch.Generator().manual_seed(8)
    b_cat, a_cat = torch.randn(out_f, 7, generator=g, dtype=torch.float64), torch.randn(7, in_f, generator=g,
                                                                                        dtype=torch.float64)
    k, split = 5, ("b" if mode == "column" else "a")

    def job(rank, group):
        size = 1 if group is GROUP_OF_ONE else t
        b = ShardSpec(dim=0).shard(b_cat, rank, size) if split == "b" else b_cat
        a = ShardSpec(dim=1).shard(a_cat, rank, size) if split == "a" else a_cat
        new_a, new_b = lowrank.product_svd(b, a, k, split, _in_index(mode, in_f, rank, size), group)
        if clamp is not None:
            new_a, new_b = lowrank.quantile_clamp(new_a, new_b, clamp, split, group)
        return {"A": new_a, "B": new_b}

    results, reference, received = _run(t, job)
    spec_a, spec_b = _factor_specs(mode)
    _check(results, reference, lambda got, ref: {"A": (ref["A"], spec_a), "B": (ref["B"], spec_b)}, t)
    clamp_bound = 0 if clamp is None else (out_f * k if split == "b" else k * in_f)
    for rank in range(t):  # the TSQR triangles, the signs, and with svd_clamp the split new factor
        assert sum(received[rank]) <= (t * 7 * 7 + 3 * t * k if t > 1 else 0) + clamp_bound, received[rank]


@pytest.mark.parametrize("t", SIZES)
@pytest.mark.parametrize("mode", ["column", "row"])
def test_pruned_svd_thresholds_and_dare_masks_do_not_depend_on_tp(mode, t):
    """The "_svd" combinations: magnitude masks from global thresholds, DARE masks drawn whole, then
    split_svd of the merged update's shards (as adapters/weighted.py `_pruned_svd`)."""
    from parallel_adapters.adapters import weighted_math as wm
    from parallel_adapters.decompose import svd

    out_f, in_f = SHAPES[mode]
    g = torch.Generator().manual_seed(4)
    deltas = [torch.randn(out_f, 3, generator=g, dtype=torch.float64) @ torch.randn(3, in_f, generator=g,
                                                                                    dtype=torch.float64)
              for _ in range(2)]
    spec = _weight_spec(mode)

    def job(rank, group):
        size = 1 if group is GROUP_OF_ONE else t
        local = [spec.shard(d, rank, size) for d in deltas]
        kept = wm.magnitude_masks(local, 0.4, [out_f * in_f] * 2, group)
        dare = wm.dare_mask((out_f, in_f), 0.5, torch.Generator().manual_seed(5), lambda f: spec.shard(f, rank, size))
        merged = wm.merge_task_tensors("ties", local, [0.6, -1.4], kept, 0.4, "total")
        m = merged.T if mode == "row" else merged
        omega = torch.randn(m.shape[1], R + 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
        res = svd.split_svd(m, R, omega, group)
        return {"ties": kept[0].double(), "dare": dare.double(), "S": res.s}

    results, reference, _ = _run(t, job)
    _check(results, reference, lambda got, ref: {"ties": (ref["ties"], spec), "dare": (ref["dare"], spec),
                                                 "S": (ref["S"], None)}, t)
    # entries up to ~10 here: a bisection midpoint (lo + hi) over float64 bit patterns overflowed int64
    assert 0.3 < reference["dare"].mean() < 0.7 and 0.35 < reference["ties"].mean() <= 0.45
