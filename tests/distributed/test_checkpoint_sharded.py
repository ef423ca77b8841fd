"""Sharded checkpoints on real gloo ranks (world 2: TP=2; world 4: TP=2 x DP=2).

The jobs live in tests/distributed/checkpoint_jobs.py; the main process then checks the files with
the offline tools (consolidate, reshard, load at other TP sizes as emulated ranks).
"""
from __future__ import annotations

import json

import torch

from parallel_adapters.checkpoint.consolidate import consolidate, reshard
from parallel_adapters.checkpoint.sharded import load_sharded, resolve_latest
from parallel_adapters.distributed.groups import ParallelGroups
from tests.distributed import checkpoint_jobs as jobs

TIMEOUT = 60


def _assert_equal(got, want):
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name


def _check_ranks(results, world):
    assert [r["rank"] for r in results] == list(range(world))
    for r in results:
        assert all(r["bitwise"].values()) and len(r["bitwise"]) == len(jobs.LAYOUT), r["bitwise"]
        assert r["optim_ok"] and r["rng_ok"], r
        assert r["extra"] == {"step": 5, "rank0": True}


def test_tp2_save_load_consolidate_reshard(pool2, tmp_path):
    results = pool2.run(jobs.job_save_load, str(tmp_path / "step-1"), 2, timeout=TIMEOUT)
    _check_ranks(results, 2)
    ckpt = tmp_path / "step-1"
    assert resolve_latest(tmp_path) == ckpt
    index = json.loads((ckpt / "index.json").read_text())
    assert (index["tp_size"], index["pp_size"], index["dp_size"]) == (2, 1, 1)
    replicated = [n for n, (_, spec, _) in jobs.LAYOUT.items() if spec.replicated]
    held_by = {n: list(index["tensors"][n]["files"]) for n in replicated}
    assert sorted(k for keys in held_by.values() for k in keys) == ["tp00-pp00", "tp01-pp00"], held_by  # once each
    assert set(index["train_state"]["optimizer"]) == {"tp00-pp00-dp00", "tp01-pp00-dp00"}
    full = jobs.full_tensors()
    _assert_equal(consolidate(ckpt), full)
    _assert_equal(load_sharded(ckpt, ParallelGroups.single(), jobs.expected(full)), full)  # TP=2 -> TP=1
    for tp in (1, 4):
        out = reshard(ckpt, tmp_path / f"tp{tp}", tp, progress=False)
        for rank in range(tp):
            got = load_sharded(out, ParallelGroups(tp_size=tp, tp_rank=rank), jobs.expected(full), collective=False)
            _assert_equal(got, {n: t.local for n, t in jobs.sharded(full, rank, tp).items()})


def test_tp2_dp2_only_dp0_writes_shards(pool4, tmp_path):
    results = pool4.run(jobs.job_save_load, str(tmp_path / "ck"), 2, timeout=TIMEOUT)
    _check_ranks(results, 4)
    ckpt = tmp_path / "ck"
    assert sorted(p.name for p in (ckpt / "shards").iterdir()) == ["tp00-pp00.safetensors", "tp01-pp00.safetensors"]
    index = json.loads((ckpt / "index.json").read_text())
    assert index["dp_size"] == 2
    assert sorted(index["train_state"]["rng"]) == [f"tp0{t}-pp00-dp0{d}" for t in range(2) for d in range(2)]
    _assert_equal(consolidate(ckpt), jobs.full_tensors())


def test_differing_replicas_raise_on_every_rank(pool2, tmp_path):
    errors = pool2.run(jobs.job_replica_mismatch, str(tmp_path / "bad"), timeout=TIMEOUT)
    for msg in errors:
        assert msg is not None
        assert f"replicated tensor '{jobs.REPLICATED_NAME}' differs across TP ranks" in msg
        assert "tp rank 0 (global rank 0) != tp rank 1 (global rank 1)" in msg
    assert list(tmp_path.iterdir()) == []  # refused, and the written temporary directory removed


def test_bad_input_on_one_rank_raises_on_every_rank(pool2, tmp_path):
    errors = pool2.run(jobs.job_local_check_failure, str(tmp_path / "bad"), timeout=TIMEOUT)
    for msg in errors:
        assert msg is not None and "rank 1 (tp01-pp00-dp00)" in msg
        assert f"tensor '{jobs.SPLIT_NAME}': local shape (5, 4)" in msg
    assert list(tmp_path.iterdir()) == []


def test_write_failure_on_one_rank_raises_on_every_rank(pool2, tmp_path):
    results = pool2.run(jobs.job_write_failure, str(tmp_path / "step-2"), str(tmp_path / "step-1"),
                        timeout=TIMEOUT)
    for r in results:
        assert r["error"] is not None
        assert "rank 1 (tp01-pp00-dp00)" in r["error"] and "optim-tp01-pp00-dp00.json" in r["error"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-1"]  # temp dir removed
    assert resolve_latest(tmp_path) == tmp_path / "step-1"
    _assert_equal(consolidate(tmp_path / "step-1"), jobs.full_tensors())


def test_load_mismatch_on_one_rank_raises_on_every_rank(pool2, tmp_path):
    ckpt = jobs.write_emulated_checkpoint(tmp_path / "ck", jobs.full_tensors(), tp_size=2)
    errors = pool2.run(jobs.job_load_mismatch, str(ckpt), timeout=TIMEOUT)
    for msg in errors:
        assert msg is not None and "rank 0 (tp00-pp00-dp00)" in msg
        assert f"missing tensor '{jobs.MISSING_NAME}'" in msg
