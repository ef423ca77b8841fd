"""sharded.py in one process: save/load round trips, resharding on load, every validation failure,
atomic publish (incl. a save SIGKILLed midway), train state.  Multi-rank checkpoints are written
with the same writer functions one fake rank at a time (tests.distributed.checkpoint_jobs)."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from parallel_adapters.checkpoint.layout import CheckpointError
from parallel_adapters.checkpoint.files import file_record
from parallel_adapters.checkpoint.sharded import (
    TEST_DELAY_ENV, capture_rng_state, load_sharded, load_train_state, resolve_latest,
    restore_rng_state, save_sharded,
)
from parallel_adapters.distributed.groups import ParallelGroups
from parallel_adapters.distributed.sharding import ShardedTensor, ShardSpec
from tests.distributed.checkpoint_jobs import (
    CONFIG, LAYOUT, MISSING_NAME, REPLICATED_NAME, SPLIT_NAME, expected, full_tensors, sharded,
    write_emulated_checkpoint,
)

REPO = Path(__file__).resolve().parents[3]
SINGLE = ParallelGroups.single()


@pytest.fixture(scope="module")
def full():
    return full_tensors()


@pytest.fixture
def tp2(tmp_path, full):
    return write_emulated_checkpoint(tmp_path / "ckpt", full, tp_size=2)


def _edit_index(ckpt: Path, mutate) -> None:
    index = json.loads((ckpt / "index.json").read_text())
    mutate(index)
    (ckpt / "index.json").write_text(json.dumps(index))


def _assert_equal(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name], want[name]), name


# ---- round trips --------------------------------------------------------------------------------

def test_single_process_save_load_round_trip(tmp_path, full):
    path = save_sharded(tmp_path / "step-1", sharded(full, 0, 1), SINGLE, CONFIG)
    assert path == (tmp_path / "step-1").absolute()
    assert resolve_latest(tmp_path) == path
    assert json.loads((path / "adapter_config.json").read_text()) == CONFIG
    index = json.loads((path / "index.json").read_text())
    assert (index["tp_size"], index["pp_size"], index["dp_size"]) == (1, 1, 1)
    assert set(index["files"]) == {"adapter_config.json", "shards/tp00-pp00.safetensors",
                                   "train_state/rng-tp00-pp00-dp00.safetensors"}
    _assert_equal(load_sharded(path, SINGLE, expected(full)), full)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-1"]  # no temp dir left


@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_tp2_checkpoint_loads_at_any_tp(tp2, full, tp_size):
    for rank in range(tp_size):
        groups = ParallelGroups(tp_size=tp_size, tp_rank=rank)
        got = load_sharded(tp2, groups, expected(full), collective=False)
        want = {n: t.local for n, t in sharded(full, rank, tp_size).items()}
        _assert_equal(got, want)


def test_load_with_another_split_of_the_same_tensor(tp2, full):
    """The model may split a tensor differently from the checkpoint (here fc1 B without chunks):
    the global tensor is the same, so the loader goes through it."""
    name = "decoder.layers.1.mlp.linear_fc1.lora_B.default.weight"
    want = expected(full)
    want[name] = (ShardSpec(dim=0), tuple(full[name].shape), torch.float64)
    got = load_sharded(tp2, ParallelGroups(tp_size=2, tp_rank=1), want, collective=False)
    assert torch.equal(got[name], full[name][16:])


def test_views_sharing_storage_are_saved(tmp_path, full):
    base = torch.randn(8, 4, dtype=torch.float64)
    tensors = {"a": ShardedTensor(base[:4], ShardSpec(), (4, 4)), "b": ShardedTensor(base.t(), ShardSpec(), (4, 8))}
    path = save_sharded(tmp_path / "s", tensors, SINGLE, CONFIG, rng_state=False)
    want = {"a": (ShardSpec(), (4, 4), torch.float64), "b": (ShardSpec(), (4, 8), torch.float64)}
    _assert_equal(load_sharded(path, SINGLE, want), {"a": base[:4], "b": base.t().contiguous()})


def test_replicated_tensors_are_stored_once(tp2):
    index = json.loads((tp2 / "index.json").read_text())
    replicated = [n for n, (_, spec, _) in LAYOUT.items() if spec.replicated]
    holders = [list(index["tensors"][n]["files"]) for n in replicated]
    assert all(len(h) == 1 for h in holders)
    assert sorted(h[0] for h in holders) == ["tp00-pp00", "tp01-pp00"]  # one on each writer
    assert index["tensors"][SPLIT_NAME]["files"] == {"tp00-pp00": "shards/tp00-pp00.safetensors",
                                                     "tp01-pp00": "shards/tp01-pp00.safetensors"}


def test_pp2_checkpoint_loads_without_pp(tmp_path, full):
    ckpt = write_emulated_checkpoint(tmp_path / "pp", full, tp_size=2, pp_size=2)
    index = json.loads((ckpt / "index.json").read_text())
    assert index["tensors"]["decoder.layers.1.mlp.linear_fc1.lora_B.default.weight"]["files"]["tp01-pp01"]
    _assert_equal(load_sharded(ckpt, SINGLE, expected(full)), full)
    stage0 = [n for n in LAYOUT if n.startswith("decoder.layers.0.")]  # one stage of a PP=2 model
    got = load_sharded(ckpt, ParallelGroups(pp_size=2), expected(full, stage0), collective=False)
    _assert_equal(got, {n: full[n] for n in stage0})


def test_save_over_existing_directory_replaces_it(tmp_path, full):
    save_sharded(tmp_path / "s", sharded(full, 0, 1), SINGLE, CONFIG)
    other = full_tensors(seed=5)
    save_sharded(tmp_path / "s", sharded(other, 0, 1), SINGLE, {"r": 1})
    _assert_equal(load_sharded(tmp_path / "s", SINGLE, expected(other)), other)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "s"]


# ---- load-side validation ----------------------------------------------------------------------

def test_flipped_byte_is_a_checksum_error_naming_the_file(tp2, full):
    path = tp2 / "shards" / "tp01-pp00.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"tp01-pp00\.safetensors: sha256 .* corrupt"):
        load_sharded(tp2, SINGLE, expected(full))


def test_missing_shard_file(tp2, full):
    (tp2 / "shards" / "tp01-pp00.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"tp01-pp00\.safetensors: file listed in index.json is missing"):
        load_sharded(tp2, SINGLE, expected(full))


def test_truncated_file_is_refused(tp2, full):
    path = tp2 / "shards" / "tp00-pp00.safetensors"
    path.write_bytes(path.read_bytes()[:-16])
    with pytest.raises(CheckpointError, match=r"tp00-pp00\.safetensors: \d+ bytes on disk.*truncated"):
        load_sharded(tp2, SINGLE, expected(full))


def test_truncated_file_with_matching_index_is_wrapped(tp2, full):
    """Even if the index was rewritten to match, safetensors' own error comes out naming the file."""
    path = tp2 / "shards" / "tp00-pp00.safetensors"
    path.write_bytes(path.read_bytes()[:-16])
    _edit_index(tp2, lambda i: i["files"].update({"shards/tp00-pp00.safetensors": file_record(path)}))
    with pytest.raises(CheckpointError, match=r"tp00-pp00\.safetensors: cannot read safetensors file"):
        load_sharded(tp2, SINGLE, expected(full))


def test_file_header_disagreeing_with_index_is_refused_before_reading(tp2, full):
    path = tp2 / "shards" / "tp01-pp00.safetensors"
    tensors = load_file(str(path))
    tensors[SPLIT_NAME] = torch.zeros(6, 4, dtype=torch.float64)  # index says [12, 4]
    save_file(tensors, str(path))
    _edit_index(tp2, lambda i: i["files"].update({"shards/tp01-pp00.safetensors": file_record(path)}))
    with pytest.raises(CheckpointError, match=rf"tp01-pp00\.safetensors: tensor '{SPLIT_NAME}' is F64\[6, 4\], "
                                              r"index.json says F64\[12, 4\]"):
        load_sharded(tp2, SINGLE, expected(full))


def test_tensor_in_file_but_not_in_index(tp2, full):
    path = tp2 / "shards" / "tp01-pp00.safetensors"
    save_file({**load_file(str(path)), "smuggled": torch.zeros(1)}, str(path))
    _edit_index(tp2, lambda i: i["files"].update({"shards/tp01-pp00.safetensors": file_record(path)}))
    with pytest.raises(CheckpointError, match=r"tp01-pp00\.safetensors: tensors not in index.json \['smuggled'\]"):
        load_sharded(tp2, SINGLE, expected(full))


def test_index_path_escaping_the_directory_is_refused(tp2, full, tmp_path):
    outside = tmp_path / "x.safetensors"
    outside.write_bytes((tp2 / "shards" / "tp01-pp00.safetensors").read_bytes())

    def escape(index):
        index["files"]["../x.safetensors"] = file_record(outside)  # a genuine checksum: only the path is bad
        index["tensors"][SPLIT_NAME]["files"]["tp01-pp00"] = "../x.safetensors"
    _edit_index(tp2, escape)
    with pytest.raises(CheckpointError, match=r"'\.\./x\.safetensors' contains '\.', '\.\.'"):
        load_sharded(tp2, SINGLE, expected(full))


def test_extra_and_missing_tensors_are_listed(tp2, full):
    want = expected(full)
    del want[REPLICATED_NAME]
    want[MISSING_NAME] = (ShardSpec(), (2, 2), torch.float64)
    with pytest.raises(CheckpointError) as info:
        load_sharded(tp2, SINGLE, want)
    assert f"missing tensor '{MISSING_NAME}'" in str(info.value)
    assert f"unexpected tensor '{REPLICATED_NAME}'" in str(info.value)


def test_wrong_dtype_and_shape(tp2, full):
    want = expected(full)
    want[SPLIT_NAME] = (ShardSpec(dim=0), (24, 8), torch.float64)
    want[REPLICATED_NAME] = (ShardSpec(), (4, 8), torch.float32)
    with pytest.raises(CheckpointError) as info:
        load_sharded(tp2, SINGLE, want)
    msg = str(info.value)
    assert f"tensor '{SPLIT_NAME}': global shape (24, 4) in checkpoint, model has (24, 8)" in msg
    assert f"tensor '{REPLICATED_NAME}': dtype float64 in checkpoint, model has float32" in msg


def test_unsupported_format_version(tp2, full):
    _edit_index(tp2, lambda i: i.update(format_version=99))
    with pytest.raises(CheckpointError, match="unsupported format_version 99"):
        load_sharded(tp2, SINGLE, expected(full))


def test_directory_without_index_is_not_a_checkpoint(tmp_path, full):
    (tmp_path / "half").mkdir()
    with pytest.raises(CheckpointError, match="incomplete save or not a checkpoint"):
        load_sharded(tmp_path / "half", SINGLE, expected(full))


# ---- save-side validation and atomicity --------------------------------------------------------

def test_local_shape_inconsistent_with_spec_is_refused(tmp_path, full):
    tensors = sharded(full, 0, 1)
    tensors[SPLIT_NAME] = ShardedTensor(torch.zeros(12, 4, dtype=torch.float64), ShardSpec(dim=0), (24, 4))
    with pytest.raises(CheckpointError, match=f"tensor '{SPLIT_NAME}': local shape \\(12, 4\\)"):
        save_sharded(tmp_path / "s", tensors, SINGLE, CONFIG)
    assert not tmp_path.joinpath("s").exists() and not list(tmp_path.iterdir())


def test_failed_save_keeps_previous_checkpoint_and_latest(tmp_path, full):
    save_sharded(tmp_path / "step-1", sharded(full, 0, 1), SINGLE, CONFIG)
    with pytest.raises(CheckpointError, match=r"rank 0 .*optim-tp00-pp00-dp00\.json: optimizer state 'bad'"):
        save_sharded(tmp_path / "step-2", sharded(full, 0, 1), SINGLE, CONFIG, optimizer_state={"bad": [1, 2]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-1"]
    assert resolve_latest(tmp_path) == tmp_path / "step-1"


def test_resolve_latest(tmp_path, full):
    assert resolve_latest(tmp_path) is None
    (tmp_path / "latest").write_text("gone\n")
    with pytest.raises(CheckpointError, match="'gone', but .* is not a complete checkpoint"):
        resolve_latest(tmp_path)
    (tmp_path / "latest").write_text("../elsewhere\n")
    with pytest.raises(CheckpointError, match="not a plain directory name"):
        resolve_latest(tmp_path)


@pytest.mark.parametrize("target", ["step-2", "step-1"])
def test_save_killed_midway_leaves_previous_checkpoint(tmp_path, full, target):
    """SIGKILL while a save stalls (test hook) after writing its files but before publishing."""
    save_sharded(tmp_path / "step-1", sharded(full, 0, 1), SINGLE, CONFIG)
    env = {**os.environ, TEST_DELAY_ENV: "60", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "tests.distributed.checkpoint_jobs", str(tmp_path / target),
                             "4096"], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not list(tmp_path.glob(f".{target}.tmp-*/train_state/rng-*.safetensors")):
            assert proc.poll() is None and time.monotonic() < deadline, "slow save did not reach the hook"
            time.sleep(0.05)
        tmp_dir = next(tmp_path.glob(f".{target}.tmp-*"))
        assert (tmp_dir / "shards" / "tp00-pp00.safetensors").stat().st_size > 8_000_000
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert resolve_latest(tmp_path) == tmp_path / "step-1"
    assert not (tmp_path / "step-2").exists()  # never published
    _assert_equal(load_sharded(tmp_path / "step-1", SINGLE, expected(full)), full)
    with pytest.raises(CheckpointError, match="incomplete save or not a checkpoint"):
        load_sharded(tmp_dir, SINGLE, expected(full))
    # The leftover does not get in the way of the next save.
    path = save_sharded(tmp_path / target, sharded(full, 0, 1), SINGLE, CONFIG)
    assert resolve_latest(tmp_path) == path


# ---- train state -------------------------------------------------------------------------------

def _draws():
    return torch.rand(4).tolist(), random.random(), np.random.rand(2).tolist()


def test_rng_capture_restore_reproduces_draws():
    state = capture_rng_state()
    assert all(t.dtype == torch.uint8 and t.dim() == 1 for t in state.values())
    assert {"torch.cpu", "python", "numpy"} <= set(state)
    first = _draws()
    restore_rng_state(state)
    assert _draws() == first
    with pytest.raises(CheckpointError, match="uint8"):
        restore_rng_state({"torch.cpu": torch.zeros(3)})


def test_train_state_round_trip(tmp_path, full):
    optim = {"decoder.layers.0.x.lora_A.exp_avg": torch.randn(3, 2, dtype=torch.float64),
             "decoder.layers.0.x.lora_A.step": torch.tensor(4.0), "lr": 1e-4, "step": 4, "name": "adamw"}
    path = save_sharded(tmp_path / "s", sharded(full, 0, 1), SINGLE, CONFIG, optimizer_state=optim,
                        extra_state={"data_position": 123, "epoch": 0})
    draws = _draws()
    opt, rng, extra = load_train_state(path, SINGLE)
    assert sorted(opt) == sorted(optim)
    assert all(torch.equal(opt[k], v) if isinstance(v, torch.Tensor) else opt[k] == v for k, v in optim.items())
    assert extra == {"data_position": 123, "epoch": 0}
    restore_rng_state(rng)
    assert _draws() == draws
    with pytest.raises(CheckpointError, match="cannot be resharded"):
        load_train_state(path, ParallelGroups(tp_size=2))


def test_train_state_absent_is_none(tp2):
    assert load_train_state(tp2, ParallelGroups(tp_size=2)) == (None, None, None)
