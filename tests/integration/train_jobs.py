"""Jobs for tests/integration/test_training.py: `run_training` on the pool's gloo ranks (no
torchrun), plus the world-size-1 reference run as a subprocess entry point:

    python -m tests.integration.train_jobs reference '<json list of overrides>' out.pt

Every job returns plain data: the global losses and grad norms, and this rank's adapter shards
(local tensor, ShardSpec, global shape) with its (tp, pp, dp) coordinates.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
ZERO = {stage: str(REPO / "configs" / "deepspeed" / f"zero{stage}.json") for stage in (1, 2, 3)}

# The tiny model and run every parity test shares: 2 layers, hidden 64, seq 32, global batch 4
# (2 micro-batches of 2: DP=1 layouts accumulate, DP=2 layouts do not), both LoRA factors random
# at init (so every factor has a gradient from step 1) and clipping active (norm > 0.5).
BASE = [
    "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=4",
    "model.num_query_groups=2", "model.max_position_embeddings=64", "data.seq_len=32",
    "optim.micro_batch=2", "optim.global_batch=4", "optim.steps=5", "optim.lr=0.01", "optim.grad_clip=0.5",
    "optim.schedule=linear", "optim.warmup_steps=1", "adapter.r=4", "adapter.lora_alpha=8",
    "adapter.init_lora_weights=false", "seed=3", "logging.every=1",
]


def prompt_base(overrides: list[str]) -> list[str]:
    """BASE for these overrides: an HF checkpoint's config.json sets the architecture; any other
    adapter kind (adapter.kind=prompt_tuning, ia3, loha, ...) has none of LoRA's adapter keys."""
    base = BASE
    if any(o.startswith("model.hf_checkpoint=") for o in overrides):
        base = [b for b in base if not b.startswith(("model.num_", "model.hidden_", "model.ffn_", "model.max_"))]
    if any(o.startswith("adapter.kind=") and o != "adapter.kind=lora" for o in overrides):
        base = [b for b in base if not b.startswith("adapter.")]
    return base


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def train_job(overrides: list[str], resume=None, tp_sum: str = "auto", stop_at: int | None = None,
              forbid_torch_files: bool = False) -> dict:
    """run_training(BASE + overrides) on every rank; the result as plain data.  forbid_torch_files:
    torch.save / torch.load (pickle files, e.g. DeepSpeed's own checkpoints) raise during the run."""
    _quiet()
    from parallel_adapters.train.run_config import load_run_config
    from parallel_adapters.train.runner import run_training

    config = load_run_config(None, prompt_base(overrides) + list(overrides))
    with _no_torch_files(forbid_torch_files):
        result = run_training(config, resume=resume, show_progress=False, return_adapter_shards=True,
                              tp_sum=tp_sum, stop_at=stop_at)
    return {
        "losses": result.losses,
        "grad_norms": result.grad_norms,
        "lrs": result.lrs,
        "start_step": result.start_step,
        "last_checkpoint": result.last_checkpoint,
        "export_dir": result.export_dir,
        "peft_max_logit_diff": result.peft_max_logit_diff,
        "resumed_from": result.resumed_from,
        "ranks": result.ranks,
        "shards": {n: (t.local, t.spec, tuple(t.global_shape)) for n, t in result.adapter_shards.items()},
        "tp_size": config.parallel.tensor,
    }


@contextlib.contextmanager
def _no_torch_files(active: bool):
    """torch.save/torch.load (both spellings) raise while active; restored afterwards (the pool's
    workers are reused)."""
    if not active:
        yield
        return
    import torch.serialization as ts

    def refuse(name: str):
        def call(*args, **kwargs):
            raise AssertionError(f"{name} was called during a run that must not write or read pickle files")
        return call

    saved = [(torch, "save"), (torch, "load"), (ts, "save"), (ts, "load")]
    originals = [getattr(mod, attr) for mod, attr in saved]
    for mod, attr in saved:
        setattr(mod, attr, refuse(f"torch.{attr}"))
    try:
        yield
    finally:
        for (mod, attr), fn in zip(saved, originals):
            setattr(mod, attr, fn)


def full_tensors(rank_results: list[dict]) -> dict[str, torch.Tensor]:
    """Unshard every adapter tensor from the per-rank results (DP rank 0 of each (tp, pp))."""
    pieces: dict[str, dict[int, torch.Tensor]] = {}
    specs = {}
    for res in rank_results:
        if res["ranks"]["dp"] != 0:
            continue
        for name, (local, spec, _) in res["shards"].items():
            pieces.setdefault(name, {})[res["ranks"]["tp"]] = local
            specs[name] = spec
    return {n: specs[n].unshard([p[i] for i in sorted(p)]) for n, p in pieces.items()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def world_size_one_reference(overrides: list[str], out: Path, clip: float, min_drop: float = 1e-3,
                             label: str | None = None) -> dict:
    """The oracle run (`reference_main` in a subprocess, world size 1) of `overrides`, loaded from
    `out`; it must train (last loss below the first by `min_drop`) with grad-norm clipping active
    (first grad norm above `clip`), or the comparison would not cover them."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               RANK="0", WORLD_SIZE="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "tests.integration.train_jobs", "reference", json.dumps(overrides),
                           str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ref = torch.load(out, weights_only=True)
    who = f"{label}: " if label else ""
    assert ref["losses"][-1] < ref["losses"][0] - min_drop, f"{who}the reference must actually train"
    assert ref["grad_norms"][0] > clip, f"{who}grad-norm clipping must be active"
    return ref


def kind_references(tmp_path_factory, overrides: dict[str, list[str]], clip: dict[str, float]):
    """get(kind): the kind's world-size-1 reference, run once per module (a module-scoped fixture's value)."""
    cache: dict = {}

    def get(kind: str) -> dict:
        if kind not in cache:
            out = tmp_path_factory.mktemp(f"reference_{kind}") / "reference.pt"
            cache[kind] = world_size_one_reference(overrides[kind], out, clip[kind], label=kind)
        return cache[kind]
    return get


def reference_main(overrides_json: str, out: str) -> None:
    """World size 1 (TP=1, PP=1, DP=1): the oracle every layout must reproduce."""
    _quiet()
    result = train_job(json.loads(overrides_json))
    full = {n: local for n, (local, _, _) in result["shards"].items()}
    torch.save({"losses": result["losses"], "grad_norms": result["grad_norms"], "full": full}, out)


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "reference":
        raise SystemExit(__doc__)
    reference_main(sys.argv[2], sys.argv[3])
