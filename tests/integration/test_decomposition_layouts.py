"""PiSSA under the layouts other than TP=2 + SP: PP=2, TP=2 x PP=2, ZeRO-2 and ZeRO-3 (DP=2)
training, resume under ZeRO-2, and a TP=2 checkpoint loaded at TP=1 (directly and after an offline reshard).

Oracles: the world-size-1 run (a subprocess, same global batch and seed; losses and grad norms
within 1e-5, every rank's adapter shards equal to the reference's full tensors sliced by their
ShardSpec); the uninterrupted run (resume, bit-exact); the TP=2 model that saved the checkpoint
(its logits, 1e-5).  The TP=1 model rebuilds the residual base W - s B0 A0 from the stored
initial factors resharded (a model on the original base gives other logits).
"""
from __future__ import annotations

import pytest
import torch

from tests.integration.test_training_kinds import evaluate_job
from tests.integration.train_jobs import ZERO, train_job, world_size_one_reference

CLIP = 0.1  # PiSSA's first grad norm is ~0.2: clipping must still be active
PISSA = ["adapter.init_lora_weights=pissa_niter_4", f"optim.grad_clip={CLIP}"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    return world_size_one_reference(PISSA, tmp_path_factory.mktemp("reference_pissa") / "reference.pt", CLIP)


def _assert_matches(results: list[dict], reference: dict, layout: str, atol: float = 1e-5) -> None:
    for res in results:
        assert res["losses"] == pytest.approx(reference["losses"], rel=1e-5, abs=1e-5)
        assert res["grad_norms"] == pytest.approx(reference["grad_norms"], rel=1e-5, abs=1e-5)
    names = {n for res in results for n in res["shards"]}
    assert names == reference["full"].keys() and names
    for res in results:  # every rank's own shards, DP replicas included
        for tensor_name, (local, spec, _) in res["shards"].items():
            want = spec.shard(reference["full"][tensor_name], res["ranks"]["tp"], res["tp_size"])
            torch.testing.assert_close(local, want, atol=atol, rtol=1e-5,
                                       msg=f"pissa {layout}: rank {res['ranks']} {tensor_name}")


def test_pissa_pp2_matches_world_size_one(pool2, reference):
    _assert_matches(pool2.run(train_job, PISSA + ["parallel.pipeline=2"]), reference, "pp2")


def test_pissa_zero3_matches_world_size_one(pool2, reference):
    _assert_matches(pool2.run(train_job, PISSA + [f"deepspeed={ZERO[3]}"]), reference, "dp2_zero3")


def test_pissa_tp2_pp2_matches_world_size_one(pool4, reference):
    """Losses and grad norms within 1e-5; the float32 factors (entries ~0.1) within 5e-5: TP=2's
    reduction order moves them by up to 1.5e-5 over the 5 steps (float32 rounding, not a sign)."""
    _assert_matches(pool4.run(train_job, PISSA + ["parallel.tensor=2", "parallel.pipeline=2"]), reference, "tp2_pp2",
                    atol=5e-5)


def test_pissa_zero2_matches_world_size_one_and_resumes(pool2, reference, tmp_path):
    """DP=2 + ZeRO-2: the world-size-1 run; 3 steps + checkpoint + a run resuming from `latest`
    (safetensors + JSON only) == the 5 steps in one go, bit-exact."""
    run = PISSA + [f"deepspeed={ZERO[2]}"]
    saving = [f"checkpoint.directory={tmp_path}/ck", "checkpoint.save_every=3"]
    straight = pool2.run(train_job, run)
    _assert_matches(straight, reference, "dp2_zero2")
    first = pool2.run(train_job, run + saving, None, "auto", 3, True)
    second = pool2.run(train_job, run + saving, None, "auto", None, True)
    assert second[0]["start_step"] == 3
    for a, b, c in zip(straight, first, second):
        assert b["losses"] + c["losses"] == a["losses"]
        assert b["grad_norms"] + c["grad_norms"] == a["grad_norms"]
        assert a["shards"].keys() == c["shards"].keys() and a["shards"]
        assert all(torch.equal(a["shards"][n][0], c["shards"][n][0]) for n in a["shards"])


def test_pissa_tp2_checkpoint_loads_at_tp1(pool2, tmp_path):
    """A PiSSA checkpoint saved at TP=2, evaluated at TP=1 (resharded on load, and resharded
    offline first): the TP=2 model's logits; the initial factors reshard like the factors."""
    from safetensors.torch import load_file

    from parallel_adapters.checkpoint.consolidate import consolidate, reshard

    pool2.run(train_job, PISSA + ["parallel.tensor=2", "optim.steps=3", f"checkpoint.directory={tmp_path}/ck",
                                  "checkpoint.save_every=3"])
    ck = tmp_path / "ck" / "step-000003"
    out = reshard(ck, tmp_path / "tp1", 1, progress=False)
    saved, resharded = consolidate(ck), consolidate(out)
    assert saved.keys() == resharded.keys() and any(n.endswith(".initial") for n in saved)
    assert all(torch.equal(saved[n], resharded[n]) for n in saved)
    tokens = torch.randint(0, 257, (2, 12), generator=torch.Generator().manual_seed(5))
    (tmp_path / "ids.txt").write_text("\n".join(" ".join(map(str, t.tolist())) for t in tokens) + "\n")
    logits = {}
    for key, tp, directory in (("tp2", 2, ck), ("tp1", 1, ck), ("tp1_resharded", 1, out)):
        pool2.run(evaluate_job, PISSA + [f"parallel.tensor={tp}"], str(directory), str(tmp_path / "ids.txt"),
                  str(tmp_path / f"{key}.safetensors"))
        logits[key] = load_file(str(tmp_path / f"{key}.safetensors"))
    assert sorted(logits["tp2"]) == ["logits.0", "logits.1", "perplexity"]
    for key in ("tp1", "tp1_resharded"):
        for name in logits["tp2"]:
            torch.testing.assert_close(logits[key][name], logits["tp2"][name], atol=1e-5, rtol=1e-5,
                                       msg=f"{key} {name}")
