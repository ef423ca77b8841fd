"""LoraConfig.share_expert_adapters: one LoRA per MoE layer's linear_fc1 (and linear_fc2), shared
by all routed experts of the layer, under EP.

Reference: the same model and adapter at world size 1 (tests/mcore/test_moe_lora_gpt.py's tiny
float64 MoE GPT, 4 experts top-2, LoRA also on attention).  Every EP rank holds a replica of the
shared factors, whose local gradient sums only its own experts' tokens: finalize_grads sums it
over EP, so EP 2 gives the world-1 losses and adapter over five AdamW steps (1e-6, float64).
Export: PEFT's target_parameters layout is per expert, so the shared factors are written into
every expert's slot (exact); merging into each expert's weight reproduces the unmerged logits.
Jobs: tests/mcore/moe_lora_jobs.py.
"""
import pytest
import torch

from tests.mcore import moe_lora_jobs as jobs
from tests.mcore.test_moe_gpt import _batch
from tests.mcore.test_moe_lora_gpt import _assert_matches_reference, _merged_adapter


def _assert_shared(adapter: dict) -> None:
    """Every expert of a layer holds the same tensor under its own name."""
    for name, full in adapter.items():
        if ".local_experts." in name:
            head, tail = name.split(".local_experts.")
            first = adapter[f"{head}.local_experts.0.{tail.split('.', 1)[1]}"]
            assert torch.equal(full, first), name


@pytest.fixture(scope="module")
def shared_reference(pool2):
    ref = pool2.run(jobs.train_job, 1, 1, 1, 1, *_batch(), share=True)[0]
    _assert_shared(ref["adapter"])
    return ref


@pytest.mark.parametrize("ep, etp", [(2, 1), (1, 2)])
def test_shared_expert_adapter_matches_world_one(pool2, shared_reference, ep, etp):
    """EP 2 (the EP sum) and expert-TP 2 (fc1's A and fc2's B are expert-TP partials, listed by
    every expert's layer: summed once)."""
    ranks = pool2.run(jobs.train_job, 1, ep, etp, 1, *_batch(), share=True)
    _assert_matches_reference(ranks, shared_reference)
    _assert_shared(_merged_adapter(ranks))
    for r in ranks:  # the engine's grad norm counts the EP replicas once
        assert r["grad_sumsq"] == pytest.approx(shared_reference["grad_sumsq"], rel=1e-9)
    if ep == 2:  # the shared factors are counted once per rank: both EP ranks train as many
        assert ranks[0]["trainable"] == ranks[1]["trainable"] == shared_reference["trainable"]


def test_shared_expert_adapter_finalize_sums_over_ep(pool2):
    """EP 2 on two ranks: the shared factors' all-reduce over EP is the only one without DP
    averaging (experts unsplit, no TP); averaging adds one over DP {0,1} (expert-DP is one rank)."""
    for r in pool2.run(jobs.collectives_job, 1, 2, "lora", *_batch(), share=True):
        assert r["finalize_dp0"] == {"all_reduce": 1}
        assert r["finalize_dp1"] == {"all_reduce": 2}


def test_shared_expert_adapter_checkpoint_ep2_loads_at_ep1(pool2, tmp_path):
    ranks = pool2.run(jobs.checkpoint_job, str(tmp_path / "ckpt"), 2, 1, 1, load_ep=1, share_expert_adapters=True)
    for r in ranks:
        assert r["differed"] and all(r["equal"].values())
        torch.testing.assert_close(r["loaded_logits"], r["saved_logits"], rtol=0, atol=0)


def test_shared_expert_adapter_exports_per_expert_and_merges(pool2):
    r = pool2.run(jobs.shared_export_job)[0]
    assert r["tied"] and r["replicated"] and r["packed"] == 8  # 2 layers x fc1, fc2 x A, B
    assert r["adapter_effect"] > 1e-3
    assert r["merged_error"] < 1e-12


def test_share_expert_adapters_refuses_per_expert_inits():
    from parallel_adapters import LoraConfig

    for kw in ({"use_dora": True}, {"init_lora_weights": "pissa"}, {"init_lora_weights": "eva"}):
        with pytest.raises(ValueError, match="share_expert_adapters"):
            LoraConfig(share_expert_adapters=True, **kw)
