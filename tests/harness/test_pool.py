"""Self-tests of the multi-rank harness (tests.harness.pool / tests.harness.counting)."""
import os
import time

import pytest
import torch
import torch.distributed as dist

from tests.harness import counting
from tests.harness.pool import JobFailed, WorkerPool

# Bound at import time in the worker, like megatron's ``dist_all_gather_func``.
_BOUND_AT_IMPORT = torch.distributed.all_gather_into_tensor


# ---------------------------------------------------------------- jobs (run on every rank)
def _all_reduce_rank_plus_one():
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return dist.get_rank(), dist.get_world_size(), t


def _raise_on_rank1(msg):
    if dist.get_rank() == 1:
        raise ValueError(msg)
    return "fine"


def _rank0_raises_rank1_waits():
    if dist.get_rank() == 0:
        raise RuntimeError("rank 0 gave up before the all_reduce")
    t = torch.ones(1)
    dist.all_reduce(t)  # never matched by rank 0
    return t


def _rank1_dies():
    if dist.get_rank() == 1:
        os._exit(7)
    dist.all_reduce(torch.ones(1))


def _sleep_forever():
    time.sleep(600)


def _skip_everywhere():
    pytest.skip("nothing to do on this world size")


def _collective_mix():
    r = dist.get_rank()
    ws = dist.get_world_size()
    x = torch.full((5,), float(r))  # float32: 20 bytes
    with counting.counted() as c:
        for _ in range(3):
            dist.all_reduce(x)
        inp = torch.arange(3, dtype=torch.float64)  # 24 bytes
        out = torch.empty(3 * ws, dtype=torch.float64)
        torch.distributed.all_gather_into_tensor(out, inp)
    return c.calls, c.bytes, c.total_calls, c.total_bytes, counting.snapshot(), out


def _nested_and_bound():
    r = dist.get_rank()
    objs = [None] * dist.get_world_size()
    with counting.counted() as obj_c:
        dist.all_gather_object(objs, {"rank": r})
    t = torch.zeros(4)
    with counting.counted() as p2p_c:
        if r == 0:
            dist.send(t, dst=1)
        else:
            dist.recv(t, src=0)
    with counting.counted() as bound_c:
        _BOUND_AT_IMPORT(torch.empty(2 * dist.get_world_size()), torch.ones(2))
    same = (torch.distributed.all_gather_into_tensor
            is torch.distributed.distributed_c10d.all_gather_into_tensor)
    return objs, dict(obj_c.calls), obj_c.total_bytes > 0, dict(p2p_c.calls), \
        dict(p2p_c.bytes), dict(bound_c.calls), same


def _every_collective():
    """Each collective once; returns name -> (calls, bytes) as counted."""
    r, ws = dist.get_rank(), dist.get_world_size()

    def t(n=4):
        return torch.ones(n)  # float32: 4 bytes per element

    def sr():
        if r == 0:
            dist.send(t(), dst=1)
        else:
            dist.recv(t(), src=0)

    def isr():
        if r == 0:
            dist.isend(t(), dst=1).wait()
        else:
            dist.irecv(t(), src=0).wait()

    def batch():
        ops = [dist.P2POp(dist.isend, t(), (r + 1) % ws), dist.P2POp(dist.irecv, t(), (r - 1) % ws)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()

    def coalesced_all_gather():
        with torch.distributed._coalescing_manager(None, async_ops=True) as cm:
            dist.all_gather_into_tensor(t(4 * ws), t())
            dist.all_gather_into_tensor(t(4 * ws), t())
        cm.wait()

    jobs = {
        "all_reduce": lambda: dist.all_reduce(t()),
        "all_gather": lambda: dist.all_gather([t() for _ in range(ws)], t()),
        "all_gather_into_tensor": lambda: dist.all_gather_into_tensor(t(4 * ws), t()),
        "_all_gather_base": lambda: dist._all_gather_base(t(4 * ws), t()),
        "all_gather_object": lambda: dist.all_gather_object([None] * ws, {"a": r}),
        "reduce_scatter": lambda: dist.reduce_scatter(t(), [t() for _ in range(ws)]),
        "reduce_scatter_tensor": lambda: dist.reduce_scatter_tensor(t(), t(4 * ws)),
        "_reduce_scatter_base": lambda: dist._reduce_scatter_base(t(), t(4 * ws)),
        "all_reduce_coalesced": lambda: dist.all_reduce_coalesced([t(), t(2)]),
        "all_gather_coalesced": lambda: dist.all_gather_coalesced([[t()] for _ in range(ws)], [t()]),
        "all_to_all": lambda: dist.all_to_all([t() for _ in range(ws)], [t() for _ in range(ws)]),
        "all_to_all_single": lambda: dist.all_to_all_single(t(4 * ws), t(4 * ws)),
        "broadcast": lambda: dist.broadcast(t(), src=0),
        "broadcast_object_list": lambda: dist.broadcast_object_list([r, "x"], src=0),
        "barrier": lambda: dist.barrier(),
        "send|recv": sr,
        "isend|irecv": isr,
        "batch_isend_irecv": batch,
        "reduce": lambda: dist.reduce(t(), dst=0),
        "gather": lambda: dist.gather(t(), [t() for _ in range(ws)] if r == 0 else None, dst=0),
        "scatter": lambda: dist.scatter(t(), [t() for _ in range(ws)] if r == 0 else None, src=0),
        "coalesced all_gather_into_tensor x2": coalesced_all_gather,
    }
    out = {}
    for name, job in jobs.items():
        with counting.counted() as c:
            job()
        out[name] = (dict(c.calls), dict(c.bytes))
    return out


def _make_group():
    g = dist.new_group(ranks=list(range(dist.get_world_size())))
    dist.all_reduce(torch.ones(1), group=g)
    return len(dist.distributed_c10d._world.pg_map)


def _count_groups():
    return len(dist.distributed_c10d._world.pg_map)


def _env_and_threads():
    return (os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads(),
            os.environ.get("PA_TEST_COLLECTIVE_TIMEOUT"), counting.installed())


def _megatron_binds_wrapper():
    from megatron.core.tensor_parallel import mappings

    ws = dist.get_world_size()
    with counting.counted() as c:
        mappings.dist_all_gather_func(torch.empty(2 * ws), torch.ones(2))
    return dict(c.calls)


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("pool_name,expected", [("pool2", 3.0), ("pool4", 10.0)])
def test_all_reduce_sum(request, pool_name, expected):
    pool = request.getfixturevalue(pool_name)
    out = pool.run(_all_reduce_rank_plus_one)
    assert [o[0] for o in out] == list(range(pool.world_size))
    assert all(o[1] == pool.world_size for o in out)
    assert all(o[2].item() == expected for o in out)


def test_worker_setup(pool2):
    out = pool2.run(_env_and_threads)
    assert all(o[0] == "1" and o[1] == 1 and o[3] for o in out), out


def test_error_on_one_rank_reports_its_traceback_and_pool_recovers(pool2):
    gen = pool2.generation
    with pytest.raises(JobFailed) as ei:
        pool2.run(_raise_on_rank1, "boom-from-rank-1")
    msg = str(ei.value)
    assert ei.value.ranks == [1]
    assert "rank 1" in msg and "ValueError" in msg and "boom-from-rank-1" in msg
    assert "Traceback (most recent call last)" in msg and "_raise_on_rank1" in msg
    assert pool2.generation == gen + 1  # restarted after the failure
    assert [o[2].item() for o in pool2.run(_all_reduce_rank_plus_one)] == [3.0, 3.0]


def test_rank_blocked_in_collective_is_reported_as_hung(pool2):
    old = pool2.failure_grace_s
    pool2.failure_grace_s = 1.0
    t0 = time.monotonic()
    try:
        with pytest.raises(JobFailed) as ei:
            pool2.run(_rank0_raises_rank1_waits)
    finally:
        pool2.failure_grace_s = old
    assert time.monotonic() - t0 < 15
    f = ei.value.failures
    assert f[0].kind == "error" and "gave up before" in f[0].message
    assert f[1].kind == "hung"
    msg = str(ei.value)
    assert "HUNG" in msg and "_rank0_raises_rank1_waits" in msg  # rank 1's stack dump
    assert [o[2].item() for o in pool2.run(_all_reduce_rank_plus_one)] == [3.0, 3.0]


def test_collective_timeout_raises_in_worker():
    # Large grace: the gloo collective timeout (2 s) must be what ends rank 1's wait.
    with WorkerPool(2, collective_timeout_s=2, failure_grace_s=30) as pool:
        assert pool.run(_env_and_threads)[0][2] == "2"
        t0 = time.monotonic()
        with pytest.raises(JobFailed) as ei:
            pool.run(_rank0_raises_rank1_waits)
        assert time.monotonic() - t0 < 20
        f = ei.value.failures
        assert f[0].kind == "error" and f[1].kind == "error", str(ei.value)
        assert "all_reduce" in f[1].traceback


def test_dead_worker_is_reported_and_replaced(pool2):
    with pytest.raises(JobFailed) as ei:
        pool2.run(_rank1_dies)
    f = ei.value.failures
    assert f[1].kind == "died" and "exit code 7" in f[1].message
    assert [o[2].item() for o in pool2.run(_all_reduce_rank_plus_one)] == [3.0, 3.0]


def test_job_timeout(pool2):
    with pytest.raises(JobFailed) as ei:
        pool2.run(_sleep_forever, timeout=1.0)
    assert {f.kind for f in ei.value.failures.values()} == {"timeout"}
    assert "_sleep_forever" in str(ei.value)  # stacks dumped at kill time
    assert [o[2].item() for o in pool2.run(_all_reduce_rank_plus_one)] == [3.0, 3.0]


def test_skip_on_all_ranks_skips_without_restart(pool2):
    gen = pool2.generation
    with pytest.raises(pytest.skip.Exception, match="nothing to do"):
        pool2.run(_skip_everywhere)
    assert pool2.generation == gen


def test_local_function_is_rejected(pool2):
    def local():
        return 1

    with pytest.raises(TypeError, match="module-level"):
        pool2.run(local)


def test_groups_created_by_a_job_are_destroyed(pool2):
    base = pool2.run(_count_groups)
    during = pool2.run(_make_group)
    assert during == [b + 1 for b in base]
    assert pool2.run(_count_groups) == base


def test_counting_exact_calls_and_bytes(pool2):
    for calls, nbytes, total_calls, total_bytes, snap, out in pool2.run(_collective_mix):
        assert calls == {"all_reduce": 3, "all_gather_into_tensor": 1}
        assert nbytes == {"all_reduce": 3 * 20, "all_gather_into_tensor": 24}
        assert total_calls == 4 and total_bytes == 84
        # counters are reset per job, so the snapshot is this job's counts
        assert snap["all_reduce"] == {"calls": 3, "bytes": 60}
        assert snap["all_gather_into_tensor"] == {"calls": 1, "bytes": 24}
        assert snap["all_gather_single"] == {"calls": 0, "bytes": 0}
        assert sum(v["calls"] for v in snap.values()) == 4
        assert out.tolist() == [0.0, 1.0, 2.0] * 2


def test_counting_nested_calls_once_and_import_time_binding(pool2):
    out = pool2.run(_nested_and_bound)
    for rank, (objs, obj_calls, obj_has_bytes, p2p_calls, p2p_bytes, bound, same) in enumerate(out):
        assert objs == [{"rank": 0}, {"rank": 1}]
        assert obj_calls == {"all_gather_object": 1} and obj_has_bytes
        assert p2p_calls == ({"send": 1} if rank == 0 else {"recv": 1})
        assert sum(p2p_bytes.values()) == 16
        assert bound == {"all_gather_into_tensor": 1}
        assert same


def test_counting_covers_every_collective_once(pool2):
    r0, r1 = pool2.run(_every_collective)
    one = {"all_gather_object", "broadcast_object_list", "barrier"}  # bytes: see below
    for name, (calls, nbytes) in r0.items():
        expect = name.split("|")[0] if name != "coalesced all_gather_into_tensor x2" else None
        if expect is None:
            assert calls == {"all_gather_into_tensor": 2} and nbytes == {"all_gather_into_tensor": 32}
            continue
        assert calls == {expect: 1}, (name, calls)
        if name not in one:
            assert nbytes[expect] in (16, 24, 32), (name, nbytes)  # 4 floats, or 2 lists
    assert r0["barrier"][1] == {} and r0["all_gather_object"][1]["all_gather_object"] > 0
    assert r1["send|recv"] == ({"recv": 1}, {"recv": 16})
    assert r1["scatter"] == ({"scatter": 1}, {})  # only the src rank sends scatter_list


@pytest.mark.slow
def test_megatron_binds_the_counting_wrapper(pool2):
    assert pool2.run(_megatron_binds_wrapper, timeout=120) == [{"all_gather_into_tensor": 1}] * 2
