"""run_training of a MoE GPT (moe.* keys, parallel.expert / parallel.expert_tensor) on gloo ranks.

Oracle: the same run at world size 1 (a subprocess), as tests/integration/test_training.py: EP=2,
and TP=2 x EP=2 on 4 ranks, give the same losses and grad norms over 3 AdamW steps with grad-norm
clipping active (so the expert-aware norm is covered: an expert counted on the wrong ranks moves the
norm, and the clipped updates), and every rank's adapter shards, expert shards included, equal the
reference's full tensors sliced by their ShardSpec.
"""
from __future__ import annotations

import pytest
import torch

from tests.integration.train_jobs import train_job, world_size_one_reference

MOE = ["moe.num_experts=4", "moe.topk=2", "moe.ffn_hidden_size=64", "moe.router_dtype=fp64", "optim.steps=3"]
VARIANTS = {  # name: (pool fixture, overrides)
    "ep2": ("pool2", ["parallel.expert=2"]),
    "tp2_ep2": ("pool4", ["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.expert=2"]),
}


@pytest.fixture(scope="module")
def moe_reference(tmp_path_factory) -> dict:
    ref = world_size_one_reference(MOE, tmp_path_factory.mktemp("moe_reference") / "reference.pt", 0.5, min_drop=1e-2)
    assert sum("local_experts" in n for n in ref["full"]) == 2 * 4 * 2 * 2  # layers x experts x fc1/fc2 x A/B
    return ref


@pytest.mark.parametrize("name", list(VARIANTS))
def test_moe_layout_matches_world_size_one(request, moe_reference, name, tmp_path):
    pool_name, overrides = VARIANTS[name]
    saved = [f"checkpoint.directory={tmp_path}/ck"]  # the run's checkpoint: each EP rank writes its experts
    results = request.getfixturevalue(pool_name).run(train_job, MOE + overrides + saved)
    checkpoint = results[0]["last_checkpoint"]
    assert checkpoint is not None and any("local_experts.3." in n for n in _saved_names(checkpoint))
    seen = set()
    for res in results:
        assert res["losses"] == pytest.approx(moe_reference["losses"], rel=1e-5, abs=1e-5)
        assert res["grad_norms"] == pytest.approx(moe_reference["grad_norms"], rel=1e-5)
        for tensor_name, (local, spec, _) in res["shards"].items():
            want = spec.shard(moe_reference["full"][tensor_name], res["ranks"]["tp"], res["tp_size"])
            torch.testing.assert_close(local, want, atol=1e-5, rtol=1e-4,
                                       msg=f"{name}: rank {res['ranks']} {tensor_name}")
            seen.add(tensor_name)
    assert seen == set(moe_reference["full"])  # every expert lives on some EP rank
    experts_per_rank = {sum("local_experts" in n for n in res["shards"]) for res in results}
    assert experts_per_rank == {2 * 2 * 2 * 2}, "EP=2: each rank holds half the experts' adapters"


def _saved_names(checkpoint) -> set[str]:
    from pathlib import Path

    from safetensors import safe_open

    names = set()
    for path in Path(checkpoint).rglob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            names |= set(f.keys())
    return names


def test_moe_resume_is_bit_exact_and_another_expert_layout_is_refused(pool2, tmp_path):
    """4 steps at EP 2 in one go == 2 steps + checkpoint + a run resuming from `latest` + 2 more
    (every rank's expert adapter shards too).  Resuming that checkpoint at EP 1 or expert-TP 2 keeps
    TP/PP/DP (1, 1, 2), so the train-state check alone would pass and each rank would restore an
    optimizer state of other experts (or other slices): refused, naming both layouts."""
    from tests.harness.pool import JobFailed

    run = MOE + ["optim.steps=4"]
    saving = [f"checkpoint.directory={tmp_path}/ck", "checkpoint.save_every=2"]
    straight = pool2.run(train_job, run + ["parallel.expert=2"])
    first = pool2.run(train_job, run + ["parallel.expert=2"] + saving, None, "auto", 2)
    second = pool2.run(train_job, run + ["parallel.expert=2"] + saving)
    assert second[0]["start_step"] == 2
    for a, b, c in zip(straight, first, second):
        assert b["losses"] + c["losses"] == a["losses"]
        assert b["grad_norms"] + c["grad_norms"] == a["grad_norms"]
        assert a["shards"].keys() == c["shards"].keys()
        assert all(torch.equal(a["shards"][n][0], c["shards"][n][0]) for n in a["shards"])
    for other, now in ((["parallel.expert=1"], "parallel.expert=1, parallel.expert_tensor=1"),
                       (["parallel.expert=1", "parallel.expert_tensor=2"], "parallel.expert=1, parallel.expert_tensor=2")):
        with pytest.raises(JobFailed, match=rf"trained with parallel\.expert=2, parallel\.expert_tensor=1; "
                                             rf"this run has {now}"):
            pool2.run(train_job, run + other + saving)
