"""What every adapter kind gets from the generic paths, for IA3, LoHa and LoKr: run_training on
real gloo ranks (the worker pools) under TP=2 + sequence parallelism, PP=2 and ZeRO 2 / 3, resume,
and resharding a TP=2 checkpoint to TP=1.

Oracles: each kind's own world-size-1 run (a subprocess, same global batch and init; losses and
grad norms within 1e-5, every rank's adapter shards equal to the reference's full tensors sliced
by their ShardSpec); the uninterrupted run (resume, bit-exact); the TP=2 model that was saved
(resharding: identical full tensors, and a TP=1 model loading the resharded checkpoint gives the
same logits).  IA3 targets all four linears so that a replicated vector with a TP-partial
gradient (linear_proj's output under SP), a column vector over fused parts (q/k/v: k and v only;
gate/up: both chunks) and a row-sharded input vector (linear_fc2, feedforward) are all covered.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.integration.test_training import _free_port
from tests.integration.train_jobs import REPO, ZERO, full_tensors, train_job

TARGETS = "[linear_qkv,linear_proj,linear_fc1,linear_fc2]"
KIND_OVERRIDES = {
    "ia3": ["adapter.kind=ia3", f"adapter.target_modules={TARGETS}", "adapter.feedforward_modules=[linear_fc2]",
            "adapter.fused_parts={linear_qkv: [k, v]}", "adapter.init_ia3_weights=true",
            "optim.grad_clip=0.01"],  # IA3's first grad norm is ~0.015: clipping must still be active
    "loha": ["adapter.kind=loha", "adapter.r=4", "adapter.alpha=8", f"adapter.target_modules={TARGETS}",
             "adapter.init_weights=false", "optim.grad_clip=0.05"],  # first grad norm ~0.09
    "lokr": ["adapter.kind=lokr", "adapter.r=2", "adapter.alpha=4", "adapter.decompose_both=true",
             "adapter.decompose_factor=4", f"adapter.target_modules={TARGETS}", "adapter.init_weights=false"],
}
LAYOUTS = {  # name: (pool fixture, overrides)
    "tp2_sp": ("pool2", ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    "pp2": ("pool2", ["parallel.pipeline=2"]),
    "dp2_zero2": ("pool2", [f"deepspeed={ZERO[2]}"]),
    "tp2_sp_zero2": ("pool2", ["parallel.tensor=2", "parallel.sequence_parallel=true", f"deepspeed={ZERO[2]}"]),
    "tp2_dp2_zero3": ("pool4", ["parallel.tensor=2", f"deepspeed={ZERO[3]}"]),
}
CASES = [(k, layout) for k in KIND_OVERRIDES for layout in ("tp2_sp", "pp2")] + [
    ("ia3", "tp2_sp_zero2"), ("loha", "dp2_zero2"), ("lokr", "tp2_sp_zero2"), ("ia3", "tp2_dp2_zero3")]
CLIP = {"ia3": 0.01, "loha": 0.05, "lokr": 0.5}  # optim.grad_clip (train_jobs.BASE: 0.5)


def _reference(kind: str, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp(f"reference_{kind}") / "reference.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               RANK="0", WORLD_SIZE="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "tests.integration.train_jobs", "reference",
                           json.dumps(KIND_OVERRIDES[kind]), str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ref = torch.load(out, weights_only=True)
    assert ref["losses"][-1] < ref["losses"][0] - 1e-3, f"{kind}: the reference must actually train"
    assert ref["grad_norms"][0] > CLIP[kind], f"{kind}: grad-norm clipping must be active"
    return ref


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict:
    cache: dict = {}

    def get(kind: str) -> dict:
        if kind not in cache:
            cache[kind] = _reference(kind, tmp_path_factory)
        return cache[kind]
    return get


@pytest.mark.parametrize("kind, layout", CASES)
def test_kind_layout_matches_world_size_one(request, references, kind, layout):
    pool_name, overrides = LAYOUTS[layout]
    reference = references(kind)
    results = request.getfixturevalue(pool_name).run(train_job, KIND_OVERRIDES[kind] + overrides)
    for res in results:
        assert res["losses"] == pytest.approx(reference["losses"], rel=1e-5, abs=1e-5)
        assert res["grad_norms"] == pytest.approx(reference["grad_norms"], rel=1e-5, abs=1e-5)
    assert full_tensors(results).keys() == reference["full"].keys() and reference["full"]
    for res in results:  # every rank's own shards, DP replicas included
        for tensor_name, (local, spec, _) in res["shards"].items():
            want = spec.shard(reference["full"][tensor_name], res["ranks"]["tp"], res["tp_size"])
            torch.testing.assert_close(local, want, atol=1e-5, rtol=1e-5,
                                       msg=f"{kind} {layout}: rank {res['ranks']} {tensor_name}")
