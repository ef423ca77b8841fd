"""Megatron MoE GPT (mcore/gpt.py + mcore/moe.py) on gloo ranks.

Reference: the same GPTSettings at world size 1 (every rank of the pool alone, the whole batch).
A tiny MoE GPT (4 experts, top-2, GQA, 2 layers, float64) at EP 2, ETP 2, TP 2 x EP 2 (SP on),
TP 2 x EP 2 x ETP 2, PP 2 and PP 2 x EP 2 must hold exactly the world-1 full weights (every
expert's, whichever rank holds it), route every token to the same experts (no capacity, so no
token dropped), and give the world-1 logits, loss and gradients (consolidated by global name).

float64 throughout, except where megatron fixes float32: the router's top-k softmax
(`topk_routing_with_score_function` takes `softmax(..., dtype=torch.float32)`), so routing
probabilities carry float32 rounding in a float64 model.  The rounding is the same at every
layout unless the router's input differs by enough to cross a float32 rounding boundary; with
this data none does (errors ~1e-16), so the tolerance stays float64-tight.  A float32 model is
checked at EP 2 too.  Jobs: tests/mcore/moe_jobs.py.
"""
import pytest
import torch

from tests.mcore import moe_jobs as jobs

VOCAB = 256
SEQ, BATCH = 16, 4
FP64 = {"params_dtype": torch.float64}
ATOL = 1e-12


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, VOCAB, (BATCH, SEQ), generator=g),
            torch.randint(0, VOCAB, (BATCH, SEQ), generator=g))


# ---------------------------------------------------------------------------------- one process

def test_moe_settings_are_checked():
    from parallel_adapters.mcore.gpt import GPTSettings

    with pytest.raises(ValueError, match="moe_router_topk"):
        GPTSettings(num_moe_experts=4, moe_router_topk=5)
    with pytest.raises(ValueError, match="moe_token_dispatcher_type"):
        GPTSettings(num_moe_experts=4, moe_token_dispatcher_type="ring")
    with pytest.raises(ValueError, match="moe_router_dtype"):
        GPTSettings(num_moe_experts=4, moe_router_dtype="bf16")
    with pytest.raises(ValueError, match="num_moe_experts"):
        GPTSettings(num_moe_experts=0)
    with pytest.raises(ValueError, match="moe_expert_capacity_factor"):
        GPTSettings(num_moe_experts=4, moe_expert_capacity_factor=-1.0)  # megatron would read it as None
    with pytest.raises(ValueError, match="moe_token_drop_policy"):
        GPTSettings(num_moe_experts=4, moe_token_drop_policy="fifo")
    GPTSettings(moe_router_topk=9)  # dense: the MoE fields are ignored


@pytest.mark.parametrize("policy", ["probs", "position"])
def test_capacity_factor_drops_tokens_over_capacity(pool2, policy):
    """moe_expert_capacity_factor reaches megatron's router: each expert keeps at most
    ceil(factor x tokens x topk / experts) of the tokens its router sees (megatron's get_capacity)."""
    import math

    for r in pool2.run(jobs.capacity_job, _batch()[0], 0.5, policy):
        assert r["config"] == (0.5, policy)
        capacity = math.ceil(0.5 * r["tokens"] * 2 / 4)
        for routing in r["maps"].values():
            per_expert = routing.sum(dim=0)
            assert per_expert.max() <= capacity and routing.sum() < r["tokens"] * 2  # some tokens dropped


def test_layout_errors_and_cpu_defaults(pool2):
    for messages in pool2.run(jobs.layout_errors_job):
        assert "expert_parallel=2" in messages["experts_per_rank"]
        assert "sequence_parallel" in messages["tp_without_sp"]
        assert "allgather" in messages["alltoall_on_cpu"]
        assert messages["te_general_gemm"] is None  # bound by build_gpt without TE, on any device (mcore/moe.py)
        assert messages["aux_loss"] is False
        assert (messages["dispatcher"], messages["experts"]) == ("MoEAllGatherTokenDispatcher", "SequentialMLP")


# ---------------------------------------------------------------------------------- parity

@pytest.fixture(scope="module")
def reference(pool2):
    out = pool2.run(jobs.moe_job, 1, 1, 1, 1, *_batch(), **FP64)
    assert torch.equal(out[0]["logits"], out[1]["logits"])  # two independent world-1 runs
    return out[0]


@pytest.fixture(scope="module")
def shared_reference(pool2):
    return pool2.run(jobs.moe_job, 1, 1, 1, 1, *_batch(), moe_shared_expert_intermediate_size=48, **FP64)[0]


def _by_key(ranks, field, key_of):
    """Merge a per-rank field into {key: value}, checking that ranks sharing a key agree."""
    merged = {}
    for out in ranks:
        for key, value in key_of(out, out[field]):
            if key in merged:
                torch.testing.assert_close(value, merged[key], rtol=0, atol=ATOL, msg=str(key))
            merged[key] = value
    return merged


def _assert_matches_reference(ranks, ref, sp: bool):
    assert ref["dtype"] == torch.float64 and all(r["dtype"] == torch.float64 for r in ranks)
    tp_ranks = 1 + max(r["coords"]["tp"] for r in ranks)
    dp = ranks[0]["sizes"]["dp"]
    # weights: exactly the world-1 tensors, every expert included, whichever rank holds it
    weights = _by_key(ranks, "weights", lambda o, w: w.items())
    assert weights.keys() == ref["weights"].keys()
    for name, full in ref["weights"].items():
        assert torch.equal(weights[name], full), name
    # routing: reassemble [seq, batch, experts] from (SP chunk, DP rows) and compare
    routing = _by_key(ranks, "routing", lambda o, m: (((layer, o["coords"]["dp"], o["coords"]["tp"] if sp else 0),
                                                         v.view(SEQ // (tp_ranks if sp else 1), BATCH // dp, -1))
                                                        for layer, v in m.items()))
    for layer, ref_map in ref["routing"].items():
        rows = [torch.cat([routing[(layer, d, t)] for t in range(tp_ranks if sp else 1)]) for d in range(dp)]
        assert torch.equal(torch.cat(rows, dim=1), ref_map.view(SEQ, BATCH, -1)), f"layer {layer} routes differently"
    assert ref["routing"][0].sum(0).gt(0).all()  # every expert gets tokens: the test exercises all
    # logits (last stage, this DP rank's rows) and the global loss
    last = [r for r in ranks if r["loss"] is not None]
    logits = _by_key(last, "logits", lambda o, v: [(o["coords"]["dp"], v)])
    torch.testing.assert_close(torch.cat([logits[d] for d in range(dp)]), ref["logits"], rtol=0, atol=ATOL)
    for r in last:
        torch.testing.assert_close(r["loss"], ref["loss"], rtol=0, atol=1e-12)
    # gradients of the global loss, consolidated by global name
    grads = _by_key(ranks, "grads", lambda o, g: g.items())
    assert grads.keys() == ref["grads"].keys()
    for name, grad in ref["grads"].items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=ATOL, msg=name)


LAYOUTS_2 = {  # tp, ep, etp, pp, sequence_parallel, microbatches
    "ep2": (1, 2, 1, 1, False, 1),
    "etp2": (1, 1, 2, 1, False, 1),
    "tp2-sp-etp2": (2, 1, 2, 1, True, 1),
    "pp2": (1, 1, 1, 2, False, 2),
}


@pytest.mark.parametrize("layout", LAYOUTS_2)
def test_two_rank_layouts_match_world_one(pool2, reference, layout):
    tp, ep, etp, pp, sp, micro = LAYOUTS_2[layout]
    ranks = pool2.run(jobs.moe_job, tp, ep, etp, pp, *_batch(), sequence_parallel=sp, num_microbatches=micro, **FP64)
    assert ranks[0]["sizes"]["ep"] == ep and ranks[0]["sizes"]["etp"] == etp
    _assert_matches_reference(ranks, reference, sp)


def test_ep2_places_experts_by_rank(pool2, reference):
    """EP rank e holds global experts 2e, 2e+1 as its local experts 0, 1."""
    ranks = pool2.run(jobs.moe_job, 1, 2, 1, 1, *_batch(), **FP64)
    for r in ranks:
        e = r["coords"]["ep"]
        assert {n.split(".")[6] for n in r["local_experts"]} == {"0", "1"}  # local indices
        held = {n.split(".")[6] for n in r["weights"] if "local_experts" in n}
        assert held == {str(2 * e), str(2 * e + 1)}


LAYOUTS_4 = {
    "tp2-sp-ep2": (2, 2, 1, 1, True, 1, {}),
    "tp2-sp-ep2-etp2-shared": (2, 2, 2, 1, True, 1, {"moe_shared_expert_intermediate_size": 48}),
    "pp2-ep2": (1, 2, 1, 2, False, 2, {}),
}


@pytest.mark.parametrize("layout", LAYOUTS_4)
def test_four_rank_layouts_match_world_one(pool4, reference, shared_reference, layout):
    tp, ep, etp, pp, sp, micro, extra = LAYOUTS_4[layout]
    ref = shared_reference if extra else reference
    ranks = pool4.run(jobs.moe_job, tp, ep, etp, pp, *_batch(), sequence_parallel=sp, num_microbatches=micro,
                      **extra, **FP64)
    assert ranks[0]["sizes"]["ep"] == ep and ranks[0]["sizes"]["etp"] == etp
    _assert_matches_reference(ranks, ref, sp)


def test_float32_ep2_matches_world_one(pool2):
    ref = pool2.run(jobs.moe_job, 1, 1, 1, 1, *_batch())[0]
    for r in pool2.run(jobs.moe_job, 1, 2, 1, 1, *_batch()):
        assert r["dtype"] == torch.float32
        torch.testing.assert_close(r["logits"], ref["logits"][r["coords"]["dp"] * 2:][:2], rtol=0, atol=1e-5)
        torch.testing.assert_close(r["loss"], ref["loss"], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------- collectives

def test_frozen_base_collectives_at_ep2(pool2):
    """The frozen MoE base (embedding trainable) at EP 2: forward+backward issues the same fixed
    set of collectives on both ranks and every step: the baseline that adapters on experts must
    not exceed."""
    steps = pool2.run(jobs.collectives_job, 2, *_batch())
    assert steps[0] == steps[1]
    first, second = steps[0]
    assert first == second
    assert first == EP2_FROZEN_BASE_CALLS


EP2_FROZEN_BASE_CALLS = {
    # per MoE layer (2 layers): forward all-gathers routing map, probs and tokens over EP and
    # reduce-scatters the expert outputs; backward reduce-scatters the token and probs gradients
    # and all-gathers the output gradient
    "all_gather_into_tensor": 2 * (3 + 1),
    "reduce_scatter_tensor": 2 * (1 + 2),
    "all_reduce": 3,  # the vocab-parallel cross entropy (over the size-1 TP group)
}
