"""Distributed EVA on real gloo ranks: the result must not depend on how the work is split.

Oracle: the same EVA in one process on the same GLOBAL batches (each DP rank gets its slice).
Megatron GPT: TP=2 x DP=2 (4 ranks), TP=2 with sequence parallelism, PP=2 (allocation across
stages); plain nn.Linear block under DP=2: ranks that would converge at different steps, a layer
that never converges (the step cap), a rank whose batch is fully masked, and the exact wire.
Jobs: tests/distributed/eva_jobs.py.
"""
from __future__ import annotations

import pytest
import torch

from parallel_adapters.eva.statistics import subspace_similarity
from tests.distributed import eva_jobs as J

SIM = 0.999
GPT_BATCHES = J.token_batches(10, batch=4, seq=16, labels=True)
BLOCK_BATCHES = J.token_batches(12, batch=8, seq=32, labels=True)


def assert_same_state(state: dict, reference: dict, sim: float = SIM) -> None:
    assert set(state) == set(reference)
    ranks = {n: k for n, (k, _, _) in state.items()}
    assert ranks == {n: k for n, (k, _, _) in reference.items()}
    assert len(set(ranks.values())) > 1, f"data should redistribute ranks: {ranks}"
    for name, (k, alpha, comps) in state.items():
        assert alpha == pytest.approx(reference[name][1])
        assert comps.shape == reference[name][2].shape
        if k:
            s = subspace_similarity(comps, reference[name][2])
            assert s >= sim, (name, s)


def block_reference(pool, batches, **kw):
    """The world-1 run (ParallelGroups.single(), whole batches), computed on a pool rank: in a
    multi-rank world EVA's convergence test is |cos|, as in the runs it is compared with (a process
    that is the whole world uses PEFT's signed test instead)."""
    return pool.run(J.block_reference, batches, **kw)[0]


def check_gpt(results: list[dict]) -> None:
    reference = results[0]["reference"]
    for r in results:
        assert not r["warnings"], r["warnings"]
        assert_same_state(r["state"], reference)
        torch.testing.assert_close(r["state"], results[0]["state"], rtol=0, atol=0)  # replicas agree exactly


# ------------------------------------------------------------------------------- Megatron GPT

def test_gpt_tp2_dp2_matches_world1(pool4):
    check_gpt(pool4.run(J.gpt_compare_job, 2, 1, False, GPT_BATCHES))


def test_gpt_tp2_dp2_with_a_fully_masked_dp_rank(pool4):
    """DP rank 1's half of every global batch is padding: its row-parallel layers see no token."""
    batches = [{**b, "attention_mask": torch.cat([b["attention_mask"][:2], torch.zeros_like(b["attention_mask"][2:])])}
               for b in GPT_BATCHES]
    check_gpt(pool4.run(J.gpt_compare_job, 2, 1, False, batches))


def test_gpt_tp2_sequence_parallel_matches_world1(pool2):
    check_gpt(pool2.run(J.gpt_compare_job, 2, 1, True, GPT_BATCHES))


def test_gpt_pp2_allocates_across_stages(pool2):
    targets = ("decoder.layers.0.self_attention.linear_qkv", "decoder.layers.1.mlp.linear_fc2")
    results = pool2.run(J.gpt_compare_job, 1, 2, False, GPT_BATCHES, targets=targets)
    check_gpt(results)
    stage_layers = [set(r["local"]) for r in results]
    assert stage_layers[0] and stage_layers[1] and not stage_layers[0] & stage_layers[1]
    ranks = {n: k for n, (k, _, _) in results[0]["state"].items()}
    assert sum(ranks.values()) == 4 * len(ranks)  # one budget over both stages
    per_stage = [sum(ranks[n] for n in layers) for layers in stage_layers]
    assert per_stage[0] != per_stage[1], f"a stage-local allocation would give {4 * len(targets)} each: {per_stage}"


def test_gpt_eva_state_saves_loads_reshards_and_initializes(pool2, tmp_path):
    results = pool2.run(J.gpt_persist_job, str(tmp_path / "eva"), GPT_BATCHES)
    for r in results:
        assert r["same_loaded"] and r["b_zero"] and r["logits_equal"]
        assert r["rank_pattern"] == {n: k for n, k in r["ranks"].items() if k != 4}
        assert r["config1"] == r["rank_pattern"]
        assert set(r["a_tp1"]) == set(r["a_tp2"])
        for name, a in r["a_tp2"].items():
            torch.testing.assert_close(r["a_tp1"][name], a, rtol=0, atol=0)


# ------------------------------------------------------------------- plain nn.Linear block, DP=2

def test_block_dp2_matches_world1_and_the_wire_is_sketches_only(pool2):
    reference = block_reference(pool2, BLOCK_BATCHES)
    results = pool2.run(J.block_eva_job, BLOCK_BATCHES, False)
    steps = results[0]["steps"]
    for r in results:
        assert_same_state(r["state"], reference)
        assert r["steps"] == steps
        # per step ONE all-gather of the packed sketches of the active SVD owners (q/k/v and
        # gate/up share), ONE decision all-reduce; plus the empty-loader check and a final broadcast
        q = 16  # ceil(sketch_multiple * round(r * rho)) = ceil(2.0 * 8)
        widths = [J.HIDDEN, J.HIDDEN, J.HIDDEN, 2 * J.HIDDEN]  # inputs of q/k/v, o, gate/up, down
        per_step = sum(q * w + q + w + 3 for w in widths) * 4  # fp32 words of every owner's sketch
        assert r["calls"] == {"all_gather_into_tensor": steps, "all_reduce": steps + 1, "broadcast": 1}
        assert r["step_bytes"][0] == per_step  # all owners active in the first step
        assert all(0 < b <= per_step for b in r["step_bytes"])  # converged layers drop out
        assert r["step_bytes"][-1] < per_step

def test_block_ranks_that_would_converge_at_different_steps_agree(pool2):
    """Rank 1's data is much noisier: alone it needs more steps than rank 0; together both stop
    at the same collectively decided step with the same state as the world-1 run on the union."""
    per_rank = [J.token_batches(12, 4, 32, seed=1, vocab=64), J.token_batches(12, 4, 32, seed=2)]
    union = [{k: torch.cat([a[k], b[k]]) for k in a} for a, b in zip(*per_rank)]
    results = pool2.run(J.block_eva_job, per_rank, True)
    steps_alone = [block_reference(pool2, b, with_steps=True)[1] for b in per_rank]
    assert steps_alone[0] != steps_alone[1], steps_alone
    assert results[0]["steps"] == results[1]["steps"]
    assert_same_state(results[0]["state"], block_reference(pool2, union))
    torch.testing.assert_close(results[0]["state"], results[1]["state"], rtol=0, atol=0)


def test_block_layer_that_never_converges_stops_at_the_cap_with_a_warning(pool2):
    results = pool2.run(J.block_eva_job, BLOCK_BATCHES, False, max_steps=4, noise_layer=True)
    for r in results:
        assert r["steps"] == 4
        assert len(r["warnings"]) == 1 and "noise_proj" in r["warnings"][0] and "max_steps=4" in r["warnings"][0]
        assert "q_proj" not in r["warnings"][0]


def test_block_fully_masked_rank(pool2):
    """Rank 1 contributes no token at all: the result is the world-1 run on rank 0's data."""
    results = pool2.run(J.block_eva_job, BLOCK_BATCHES, False, mask_rank=1)
    reference = block_reference(pool2, J.dp_slice(BLOCK_BATCHES, 0, 2))
    for r in results:
        assert_same_state(r["state"], reference)


def test_block_without_gathering_each_rank_computes_alone(pool2):
    """PEFT's gather_distributed_inputs=False: no DP exchange, each rank's result is its own data's."""
    per_rank = [J.token_batches(12, 4, 32, seed=1, vocab=64), J.token_batches(12, 4, 32, seed=2)]
    results = pool2.run(J.block_no_gather_job, per_rank)
    for r in results:
        assert r["calls"] == {}
        for name, (k, alpha, comps) in r["state"].items():
            ref = r["reference"][name]
            assert (k, alpha) == ref[:2], name
            torch.testing.assert_close(comps, ref[2], rtol=0, atol=0)
    assert any(not torch.equal(results[0]["state"][n][2], results[1]["state"][n][2]) for n in results[0]["state"])
