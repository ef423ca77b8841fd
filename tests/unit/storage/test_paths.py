"""storage/paths.py: relative paths from an index are refused unless plain and inside."""
from __future__ import annotations

import os

import pytest

from parallel_adapters.storage.errors import CheckpointError
from parallel_adapters.storage.paths import check_plain_name, check_relpath, resolve_inside


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a/../b", "a//b", "./a", "a/./b", "C:x", "a\\b",
                                 "", "x\x00y", None, 3])
def test_relpath_refuses_unsafe(bad):
    with pytest.raises(CheckpointError):
        check_relpath(bad)


def test_relpath_accepts_plain_paths():
    assert check_relpath("shards/tp00-pp00.safetensors") == "shards/tp00-pp00.safetensors"


def test_resolve_inside_refuses_symlink_escape(tmp_path):
    ckpt = tmp_path / "ckpt"
    (ckpt / "shards").mkdir(parents=True)
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    os.symlink(tmp_path / "outside.safetensors", ckpt / "shards" / "link.safetensors")
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        resolve_inside(ckpt, "shards/link.safetensors")
    assert resolve_inside(ckpt, "shards/x.safetensors") == (ckpt / "shards" / "x.safetensors").resolve()


def test_plain_name():
    assert check_plain_name("step-10", "latest") == "step-10"
    for bad in ("", "..", "a/b", "/abs"):
        with pytest.raises(CheckpointError, match="plain directory name"):
            check_plain_name(bad, "latest")
