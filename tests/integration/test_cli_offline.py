"""The offline CLI commands (inspect, consolidate) on a checkpoint written by the checkpoint
module's own writer, run as real subprocesses.  Oracle: the full tensors the checkpoint was
made from."""
import subprocess
import sys

import pytest
import torch

from parallel_adapters.checkpoint.consolidate import consolidate
from parallel_adapters.checkpoint.reader import CheckpointReader
from tests.distributed.checkpoint_jobs import full_tensors, write_emulated_checkpoint


def _cli(*args, check=True):
    return subprocess.run([sys.executable, "-m", "parallel_adapters", *args], capture_output=True, text=True,
                          check=check, timeout=120)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    full = full_tensors()
    return write_emulated_checkpoint(tmp_path_factory.mktemp("cli") / "step-1", full, 2), full


def test_inspect_lists_every_tensor_with_layout(checkpoint):
    ckpt, full = checkpoint
    out = _cli("inspect", str(ckpt)).stdout
    assert "tp=2 pp=1" in out
    for name, tensor in full.items():
        line = next(l for l in out.splitlines() if l.startswith(name + " "))
        assert "x".join(map(str, tensor.shape)) in line
    assert "replicated" in out and "x2 chunks" in out


@pytest.mark.parametrize("tp", [1, 4])
def test_consolidate_writes_a_checkpoint_at_the_requested_tp(checkpoint, tmp_path, tp):
    ckpt, full = checkpoint
    _cli("consolidate", str(ckpt), "--out", str(tmp_path / "out"), "--tp", str(tp))
    with CheckpointReader(tmp_path / "out") as reader:
        assert reader.tp_size == tp
    got = consolidate(tmp_path / "out")
    assert sorted(got) == sorted(full) and all(torch.equal(got[n], full[n]) for n in full)


def test_user_error_is_one_line_and_exit_code_2(tmp_path):
    result = _cli("inspect", str(tmp_path / "missing"), check=False)
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_verify_passes_a_good_checkpoint_and_names_a_corrupt_file(checkpoint, tmp_path):
    import shutil

    from tests.distributed.checkpoint_jobs import corrupt_last_byte

    ckpt, _ = checkpoint
    out = _cli("verify", str(ckpt)).stdout
    assert ": ok (" in out and "tensors" in out
    bad = tmp_path / "step-1"
    shutil.copytree(ckpt, bad)
    corrupt_last_byte(bad / "shards" / "tp01-pp00.safetensors")
    result = _cli("verify", str(bad), check=False)
    assert result.returncode == 2
    assert "tp01-pp00.safetensors: sha256" in result.stderr and "corrupt" in result.stderr
