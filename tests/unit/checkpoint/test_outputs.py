"""outputs.py, run_lock.py and finite.py in one process: which outputs are refused, what a
failed staged write leaves behind (nothing), the lock's owner and stale takeover, and the
non-finite checks against a dense float64 product."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from parallel_adapters.checkpoint.finite import delta_is_finite, nonfinite_config_keys, nonfinite_count
from parallel_adapters.checkpoint.outputs import (
    OUTPUT_MARKER, StagedDirectory, check_output_dir, check_output_file, checkpoint_inputs,
)
from parallel_adapters.checkpoint.run_lock import LOCK_FILE, RunLock, remove_leftovers
from parallel_adapters.user_errors import UserError


def _run_dir(tmp_path):
    run = tmp_path / "ckpt"
    (run / "step-000002").mkdir(parents=True)
    (run / "step-000002" / "index.json").write_text("{}")
    (run / "latest").write_text("step-000002\n")
    return run


def test_an_output_that_is_contains_or_lies_inside_an_input_is_refused(tmp_path):
    run = _run_dir(tmp_path)
    inputs = checkpoint_inputs(run / "step-000002")
    for out, relation in ((run / "step-000002", "is"), (run, "contains"), (tmp_path, "contains"),
                          (run / "step-000002" / "shards", "lies inside"), (run / "step-000003", "lies inside"),
                          (run / "latest", "lies inside")):
        with pytest.raises(UserError, match=rf"--out {out} {relation} the "):
            check_output_dir(out, "export", inputs)
    assert check_output_dir(run / "exported", "export", inputs) == (run / "exported").resolve()


def test_symlinks_do_not_hide_an_input(tmp_path):
    base = tmp_path / "hf"
    base.mkdir()
    (tmp_path / "alias").symlink_to(base)
    with pytest.raises(UserError, match="is the Hugging Face base"):
        check_output_dir(tmp_path / "alias", "merge", [("Hugging Face base", base)])


def test_non_empty_outputs_need_to_be_ours_and_overwrite(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty and not an output of `parallel-adapters export`"):
        check_output_dir(other, "export", overwrite=True)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="is a Hugging Face model directory"):
        check_output_dir(hf, "merge", overwrite=True)
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / OUTPUT_MARKER).write_text(json.dumps({"command": "export"}))
    with pytest.raises(UserError, match="pass --overwrite"):
        check_output_dir(ours, "export")
    with pytest.raises(UserError, match="not an output of `parallel-adapters merge`"):
        check_output_dir(ours, "merge", overwrite=True)
    assert check_output_dir(ours, "export", overwrite=True) == ours.resolve()
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        check_output_dir(tmp_path / "file", "export")


def test_output_files(tmp_path):
    existing = tmp_path / "model.safetensors"
    existing.write_bytes(b"weights")
    with pytest.raises(UserError, match="exists and is not an output"):
        check_output_file(existing, "evaluate", overwrite=True)
    with pytest.raises(UserError, match="pass --overwrite"):
        check_output_file(existing, "evaluate", is_ours=lambda p: True)
    assert check_output_file(existing, "evaluate", overwrite=True, is_ours=lambda p: True) == existing
    with pytest.raises(UserError, match="is a directory"):
        check_output_file(tmp_path, "evaluate")
    with pytest.raises(UserError, match="is the --tokens file"):
        check_output_file(tmp_path / "ids.txt", "evaluate", [("--tokens file", tmp_path / "ids.txt")])


def test_a_failed_staged_write_leaves_nothing_and_keeps_the_old_output(tmp_path):
    out = tmp_path / "new" / "deeper" / "out"
    with pytest.raises(RuntimeError, match="disk"):
        with StagedDirectory(out, "export") as tmp:
            (tmp / "a").write_text("partial")
            raise RuntimeError("disk")
    assert list(tmp_path.iterdir()) == []  # no temporary, and the parents it created are gone
    with StagedDirectory(out, "export") as tmp:
        (tmp / "a").write_text("v1")
    with pytest.raises(RuntimeError):
        with StagedDirectory(out, "export") as tmp:
            (tmp / "a").write_text("v2")
            raise RuntimeError("disk")
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_MARKER, "a"] and (out / "a").read_text() == "v1"
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]
    with StagedDirectory(out, "export") as tmp:
        (tmp / "b").write_text("v2")
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_MARKER, "b"]


_HOLD = """
import sys, time
from parallel_adapters.checkpoint.run_lock import RunLock
RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_a_live_owner_is_named_and_a_dead_one_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"in use by another run \(pid {holder.pid} on host "):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    (tmp_path / ".step-000004.tmp-abc").mkdir()
    (tmp_path / ".latest.tmp-abc").write_text("x")
    (tmp_path / "step-000003").mkdir()
    with RunLock(tmp_path) as lock:
        assert lock.stale_owner["pid"] == holder.pid
        assert lock.removed == [".latest.tmp-abc", ".step-000004.tmp-abc"]
        owner = json.loads((tmp_path / LOCK_FILE).read_text())
        assert owner["pid"] == os.getpid() and owner["host"] and owner["started"]
        with pytest.raises(UserError, match=rf"pid {os.getpid()}"):
            RunLock(tmp_path).acquire()  # one run per directory, even within a process
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000003"]
    with RunLock(tmp_path) as lock:
        assert lock.stale_owner is None  # released cleanly: nothing stale


def test_remove_leftovers_keeps_everything_else(tmp_path):
    for name in ("step-000001", ".step-000001.old-1", "latest", ".hidden"):
        (tmp_path / name).mkdir() if name.startswith(("step", ".step")) else (tmp_path / name).write_text("")
    assert remove_leftovers(tmp_path) == [".step-000001.old-1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "latest", "step-000001"]


def test_nonfinite_counts_and_config_keys():
    t = torch.tensor([1.0, float("nan"), float("inf"), -float("inf")])
    assert nonfinite_count(t) == 3 and nonfinite_count(torch.arange(3)) == 0
    config = {"r": 8, "lora_alpha": float("nan"), "alpha_pattern": {"a": 1.0, "b": float("inf")}}
    assert nonfinite_config_keys(config) == ["lora_alpha", "alpha_pattern.b"]


@pytest.mark.parametrize("scale", [1.0, 1e15, 1e20])
def test_delta_is_finite_agrees_with_the_dense_product(scale):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 16, generator=g, dtype=torch.float64) * scale
    b = torch.randn(8, 4, generator=g, dtype=torch.float64) * scale
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        dense = bool(torch.isfinite((2.0 * (b @ a)).to(dtype)).all())
        assert delta_is_finite(a.float(), b.float(), 2.0, dtype) == dense
    a[0, 0] = float("nan")
    assert not delta_is_finite(a, b, 1.0, torch.float32)


def test_the_lock_is_released_when_its_owner_is_killed(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    started = time.time()
    with RunLock(tmp_path):
        assert time.time() - started < 5
