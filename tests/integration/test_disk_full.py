"""A full disk, on a small tmpfs the test mounts (skipped where mounting is not permitted): export,
merge, consolidate and a checkpoint save fail with one message, leave no temporary file or
directory, and leave a previous output intact."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from parallel_adapters.checkpoint.layout import CheckpointError
from parallel_adapters.checkpoint.sharded import save_sharded
from parallel_adapters.distributed.groups import ParallelGroups
from parallel_adapters.distributed.sharding import REPLICATED, ShardedTensor
from tests.integration.test_cli_export import saved  # noqa: F401,F811  (the fixture: HF base + TP=2 checkpoint)
from tests.integration.test_nothing_lost import _cli, _digests, _refused


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(mount: Path) -> None:
    """Write until the file system is full."""
    fd = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)


def _hidden(mount: Path) -> list[str]:
    return sorted(p.name for p in mount.rglob(".*") if p.name != ".parallel-adapters-output.json")


def test_offline_commands_fail_cleanly_and_keep_the_previous_output(saved, small_disk):  # noqa: F811
    step, hf = saved["ckpt"], saved["hf"]
    out = small_disk / "peft"
    first = _cli("export", step, "--out", out, "--hf-config", hf)
    assert first.returncode == 0, first.stderr
    previous = _digests(out)
    _fill(small_disk)
    _refused(_cli("export", step, "--out", out, "--hf-config", hf, "--overwrite"), "No space left on device")
    _refused(_cli("consolidate", step, "--out", small_disk / "new" / "full"), "No space left on device")
    _refused(_cli("merge", step, "--base", hf, "--out", small_disk / "merged"), "No space left on device")
    assert _digests(out) == previous
    assert _hidden(small_disk) == [] and sorted(p.name for p in small_disk.iterdir()) == ["filler", "peft"]


def test_a_checkpoint_save_fails_cleanly(small_disk):
    tensors = {"w": ShardedTensor(torch.ones(64, 1024), REPLICATED, (64, 1024))}  # 256 KiB: more than fits
    with pytest.raises(CheckpointError, match="No space left on device"):
        save_sharded(small_disk / "ckpt" / "step-000001", tensors, ParallelGroups.single(), {"r": 1})
    assert _hidden(small_disk) == [] and not (small_disk / "ckpt" / "step-000001").exists()
    shutil.rmtree(small_disk / "ckpt")
