"""torchrun end to end: two nodes over c10d rendezvous, recovery of a SIGKILLed rank with
--max-restarts, and the evaluate command.

Oracles: an uninterrupted run of the same config (same final loss), the metrics of the
two-node run (all steps present), and the same evaluation at TP=1 (same logits and perplexity).
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def _overrides(run_dir, steps, save_every=0, tensor=2):
    return [f"parallel.tensor={tensor}", f"optim.steps={steps}", "eva=null", "adapter.init_lora_weights=false",
            "export.peft_dir=null", "export.verify_with_peft=false", f"checkpoint.directory={run_dir}/ckpt",
            f"checkpoint.save_every={save_every}", "checkpoint.keep_last=3",
            f"logging.metrics_jsonl={run_dir}/metrics.jsonl"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run_dir):
    lines = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return {rec["step"]: rec["loss"] for rec in lines if "loss" in rec}


def _train(run_dir, steps, save_every=0, extra=()):
    cmd = [*TORCHRUN, "--standalone", "--nproc_per_node", "2", *extra, "-m", "parallel_adapters", "train",
           str(ROOT / "configs/tiny.yaml"), *_overrides(run_dir, steps, save_every)]
    return subprocess.Popen(cmd, cwd=run_dir, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_nodes_with_c10d_rendezvous(tmp_path):
    port = _free_port()
    procs = [subprocess.Popen(
        [*TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d",
         "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes", "--node-rank", str(node),
         "-m", "parallel_adapters", "train", str(ROOT / "configs/tiny.yaml"), *_overrides(tmp_path, 4)],
        cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert sorted(_losses(tmp_path)) == [1, 2, 3, 4]
    assert (tmp_path / "ckpt" / "latest").is_file()


def _workers(proc):
    return [c for c in psutil.Process(proc.pid).children(recursive=True)
            if "parallel_adapters" in " ".join(c.cmdline()) and "torch.distributed.run" not in " ".join(c.cmdline())]


def test_killed_rank_recovers_from_last_checkpoint(tmp_path):
    steps, every = 160, 20
    for name in ("ref", "crash"):
        (tmp_path / name).mkdir()
    reference = _train(tmp_path / "ref", steps)
    crash = _train(tmp_path / "crash", steps, every, extra=("--max-restarts", "1"))
    latest, deadline = tmp_path / "crash" / "ckpt" / "latest", time.time() + 180
    while not latest.is_file() and crash.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    victims = _workers(crash)
    assert latest.is_file() and victims, "the run ended before a checkpoint appeared"
    victims[-1].send_signal(signal.SIGKILL)
    out = crash.communicate(timeout=300)[0]
    ref_out = reference.communicate(timeout=300)[0]
    assert crash.returncode == 0, out[-4000:]
    assert reference.returncode == 0, ref_out[-4000:]
    resumed = re.search(r"over steps (\d+)\.\.(\d+)", out)
    assert resumed and int(resumed.group(1)) > 1, "the restarted attempt did not resume from a checkpoint"
    crashed, clean = _losses(tmp_path / "crash"), _losses(tmp_path / "ref")
    assert max(crashed) == max(clean) == steps
    assert crashed[steps] == clean[steps]


def test_evaluate_at_tp2_matches_tp1(tmp_path):
    run = _train(tmp_path, 6, save_every=6)
    assert run.wait(timeout=240) == 0, run.stdout.read()[-3000:]
    ckpt = tmp_path / "ckpt" / (tmp_path / "ckpt" / "latest").read_text().strip()
    (tmp_path / "ids.txt").write_text("72 101 108 108 111 32 119 111\n\n84 104 101 32 114 105 118 101 114\n")
    results = []
    for tensor in (2, 1):
        out = tmp_path / f"eval-tp{tensor}.safetensors"
        cmd = [*TORCHRUN, "--standalone", "--nproc_per_node", str(tensor), "-m", "parallel_adapters", "evaluate",
               str(ROOT / "configs/tiny.yaml"), *_overrides(tmp_path, 6, tensor=tensor), "--checkpoint", str(ckpt),
               "--tokens", str(tmp_path / "ids.txt"), "--out", str(out)]
        done = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        results.append(load_file(str(out)))
    tp2, tp1 = results
    assert sorted(tp2) == ["logits.0", "logits.1", "perplexity"] and tp2["logits.1"].shape == (9, 257)
    for key in ("logits.0", "logits.1"):
        torch.testing.assert_close(tp2[key], tp1[key], atol=1e-5, rtol=1e-5)
    ids = torch.tensor([84, 104, 101, 32, 114, 105, 118, 101, 114])
    ce1 = torch.nn.functional.cross_entropy(tp2["logits.1"][:-1].double(), ids[1:], reduction="sum")
    assert 1.0 < tp2["perplexity"].item() < 257 and ce1.item() > 0
    assert tp2["perplexity"].item() == pytest.approx(tp1["perplexity"].item(), rel=1e-5)
