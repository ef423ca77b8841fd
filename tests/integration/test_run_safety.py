"""`train` as an unlucky user meets it, on one process (no torchrun): two runs on one checkpoint
directory, a save killed with SIGKILL, a loss that turns NaN, a checkpoint with a planted NaN, a
fresh run over old checkpoints.  Oracles: the checkpoint files' sha256 before and after, the
directory listing, and the exit code and message of each refusal."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from parallel_adapters.checkpoint.sharded import TEST_DELAY_ENV
from tests.integration.test_nothing_lost import _digests, _first_factor, _plant, _refused

ROOT = Path(__file__).resolve().parents[2]


def _args(ckpt: Path, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "parallel_adapters", "train", str(ROOT / "configs/tiny.yaml"), "parallel.tensor=1",
            f"optim.steps={steps}", "optim.warmup_steps=0", "eva=null", "adapter.init_lora_weights=false",
            "export.peft_dir=null", "export.verify_with_peft=false", f"checkpoint.directory={ckpt}",
            "checkpoint.save_every=1", "checkpoint.keep_last=1", "logging.metrics_jsonl=null", *extra]


def _env(**extra: str) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **extra}


def _train(ckpt: Path, steps: int, *extra: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(_args(ckpt, steps, *extra), capture_output=True, text=True, timeout=300, env=_env(**env))


def _steps(ckpt: Path) -> list[str]:
    return sorted(p.name for p in ckpt.iterdir() if p.name.startswith("step-"))


def test_one_run_per_directory_and_a_killed_save_is_cleaned_up(tmp_path):
    ckpt = tmp_path / "ckpt"
    first = subprocess.Popen(_args(ckpt, 2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=_env(**{TEST_DELAY_ENV: "60"}))
    deadline = time.time() + 120
    while not list(ckpt.glob(".step-*.tmp-*")) and first.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert list(ckpt.glob(".step-*.tmp-*")), "the first run never reached its save"
    second = _train(ckpt, 2)
    assert second.returncode == 2, second.stderr
    assert f"in use by another run (pid {first.pid} on host" in second.stderr and "Traceback" not in second.stderr
    first.send_signal(signal.SIGKILL)  # mid-save: its temporary directory stays behind
    first.wait()
    assert list(ckpt.glob(".step-*.tmp-*")) and not _steps(ckpt)
    resumed = _train(ckpt, 2)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "removed what interrupted saves left" in resumed.stdout
    assert sorted(p.name for p in ckpt.iterdir()) == [".parallel-adapters-output.json", "latest", "step-000002"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("run") / "ckpt"
    done = _train(ckpt, 1)
    assert done.returncode == 0, done.stdout + done.stderr
    return ckpt


def test_a_fresh_run_does_not_replace_old_checkpoints_unless_told(trained, tmp_path):
    ckpt = tmp_path / "ckpt"
    os.system(f"cp -a {trained} {ckpt}")
    before = _digests(ckpt)
    _refused(_train(ckpt, 1, "--no-resume"), "holds checkpoints of an earlier run", "--overwrite")
    assert _digests(ckpt) == before
    done = _train(ckpt, 2, "--no-resume", "--overwrite", "optim.lr=1e-3")  # overrides after the flags, too
    assert done.returncode == 0, done.stderr
    assert _steps(ckpt) == ["step-000002"]


def test_a_planted_nan_stops_the_resume_and_touches_nothing(trained, tmp_path):
    ckpt = tmp_path / "ckpt"
    os.system(f"cp -a {trained} {ckpt}")
    step = ckpt / (ckpt / "latest").read_text().strip()
    names = []
    _plant(step, mutate_tensors=lambda t: (names.append(_first_factor(t)), t[names[0]].view(-1).__setitem__(0, float("nan"))))
    before = _digests(ckpt)
    _refused(_train(ckpt, 3), names[0], "non-finite")
    assert _digests(ckpt) == before


def test_a_nan_loss_stops_before_saving_or_pruning(tmp_path):
    ckpt = tmp_path / "ckpt"
    done = _train(ckpt, 4, "optim.lr=1e30", "optim.grad_clip=0", "optim.schedule=constant")
    assert done.returncode == 1, done.stdout + done.stderr
    line = [l for l in done.stderr.splitlines() if l.startswith("parallel-adapters train: error:")]
    assert len(line) == 1 and "is not finite; stopped before saving or pruning anything" in line[0], done.stderr
    bad_step = int(line[0].split("step ")[1].split(":")[0])
    last_good = f"step-{bad_step - 1:06d}"
    assert _steps(ckpt) == [last_good] and (ckpt / "latest").read_text().strip() == last_good
    extra = json.loads((ckpt / last_good / "train_state" / "extra_state.json").read_text())
    assert extra["finite_checked"] is True
    skipped = _train(tmp_path / "skip", 3, "optim.lr=1e30", "optim.grad_clip=0", "optim.schedule=constant",
                     "optim.nonfinite=skip")
    assert skipped.returncode == 0, skipped.stderr
    assert "update skipped (optim.nonfinite=skip)" in skipped.stderr


def test_a_config_error_under_torchrun_is_printed_once(tmp_path):
    """Three ranks find the same bad key: one line, exit code non-zero, nothing created."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3", "-m",
           "parallel_adapters", "train", str(ROOT / "configs/tiny.yaml"), "optim.steps=2", "optim.warmup_steps=5",
           f"checkpoint.directory={tmp_path / 'ckpt'}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=_env(), cwd=tmp_path)
    assert done.returncode != 0
    lines = [l for l in (done.stdout + done.stderr).splitlines() if "parallel-adapters train: error:" in l]
    assert len(lines) == 1 and "optim.warmup_steps" in lines[0], done.stdout + done.stderr
    assert not (tmp_path / "ckpt").exists()
