"""LoRA on a Megatron MoE GPT's routed experts (and attention) under EP, expert-TP, TP+SP and PP.

Reference: the same model and adapter at world size 1 (every rank of the pool alone, the whole
batch).  A tiny MoE GPT (4 experts, top-2, GQA, 2 layers, float64; the router's softmax is fp32
in megatron, see tests/mcore/test_moe_gpt.py) with LoRA on linear_qkv, linear_proj and every
expert's linear_fc1 / linear_fc2 must give the world-1 losses over five AdamW steps and the
world-1 adapter after them, consolidated by global name (global expert index) and ShardSpec,
within 1e-6.  With expert LoRA, forward+backward issues no more collectives than the frozen base
with the embedding trainable; finalize_grads' collectives are counted.  Jobs:
tests/mcore/moe_lora_jobs.py.
"""
import pytest
import torch

from tests.mcore import moe_lora_jobs as jobs
from tests.mcore.test_moe_gpt import _batch

TOL = 1e-6


@pytest.fixture(scope="module")
def reference(pool2):
    out = pool2.run(jobs.train_job, 1, 1, 1, 1, *_batch())
    assert out[0]["losses"] == out[1]["losses"]  # two independent world-1 runs
    return out[0]


def _merged_adapter(ranks):
    merged = {}
    for r in ranks:
        for name, full in r["adapter"].items():
            if name in merged:  # ranks holding the same tensor agree
                torch.testing.assert_close(full, merged[name], rtol=0, atol=1e-12, msg=name)
            merged[name] = full
    return merged


def _assert_matches_reference(ranks, ref):
    losses = ref["losses"]
    assert losses[-1] < losses[0] - 1e-3, "the reference must actually train"
    for r in ranks:
        if r["losses"][0] is not None:
            assert r["losses"] == pytest.approx(losses, rel=0, abs=TOL)
    adapter = _merged_adapter(ranks)
    assert adapter.keys() == ref["adapter"].keys()
    for name, full in ref["adapter"].items():
        torch.testing.assert_close(adapter[name], full, rtol=0, atol=TOL, msg=name)


def test_reference_adapts_every_expert_and_attention(reference):
    names = reference["adapter"]
    experts = {n.split(".")[6] for n in names if ".local_experts." in n}
    assert experts == {"0", "1", "2", "3"}
    per_layer = {"self_attention.linear_qkv", "self_attention.linear_proj"} | {
        f"mlp.experts.local_experts.{e}.{fc}" for e in range(4) for fc in ("linear_fc1", "linear_fc2")}
    modules = {n.split(".lora_")[0] for n in names}
    assert modules == {f"decoder.layers.{i}.{m}" for i in range(2) for m in per_layer}
    assert not any("router" in n for n in names)  # the router is not adapted


LAYOUTS_2 = {  # tp, ep, etp, pp, sequence_parallel, microbatches
    "ep2": (1, 2, 1, 1, False, 1),
    "etp2": (1, 1, 2, 1, False, 1),
    "pp2": (1, 1, 1, 2, False, 2),
}


@pytest.mark.parametrize("layout", LAYOUTS_2)
def test_two_rank_layouts_match_world_one(pool2, reference, layout):
    tp, ep, etp, pp, sp, micro = LAYOUTS_2[layout]
    ranks = pool2.run(jobs.train_job, tp, ep, etp, pp, *_batch(), sequence_parallel=sp, num_microbatches=micro)
    _assert_matches_reference(ranks, reference)


def test_ep2_ranks_hold_their_experts_under_global_names(pool2, reference):
    """EP rank e holds only global experts 2e, 2e+1 (its local 0, 1): nothing replicated over EP."""
    for r in pool2.run(jobs.train_job, 1, 2, 1, 1, *_batch(), steps=1):
        held = {n.split(".")[6] for n in r["held"] if ".local_experts." in n}
        assert held == {str(2 * r["ep_rank"]), str(2 * r["ep_rank"] + 1)}
        assert r["trainable"] < reference["trainable"]


LAYOUTS_4 = {
    "tp2-sp-ep2": (2, 2, 1, 1, True, 1),
    "tp2-sp-ep2-etp2": (2, 2, 2, 1, True, 1),
}


@pytest.mark.parametrize("layout", LAYOUTS_4)
def test_four_rank_layouts_match_world_one(pool4, reference, layout):
    tp, ep, etp, pp, sp, micro = LAYOUTS_4[layout]
    ranks = pool4.run(jobs.train_job, tp, ep, etp, pp, *_batch(), sequence_parallel=sp, num_microbatches=micro)
    _assert_matches_reference(ranks, reference)


FINALIZE_CALLS = {  # pool, tp, ep, etp -> all-reduces of finalize_grads(data_parallel=False), (=True)
    # TP partials: one all-reduce over TP for the attention adapters (experts are not split at
    # expert-TP 1); DP averaging: dense over DP, experts over expert-DP, one call per distinct set
    # of ranks: EP 2 alone has DP {0,1} and expert-DP groups of one; TP 2 x EP 2 has DP = expert-DP
    # = {0,2},{1,3} (one call); EP 2 on 4 ranks has DP {0,1,2,3} and expert-DP {0,2},{1,3} (two).
    # Expert-TP 2 at TP 1 on 2 ranks: the expert row layers' replicated lora_A sums over expert-TP
    # {0,1} (one call; no dense partials at TP 1), then dense over DP {0,1}, the same ranks as
    # expert-TP but a second call (expert-DP is one rank: nothing).
    ("pool2", 1, 2, 1): (0, 1),
    ("pool4", 2, 2, 1): (1, 2),
    ("pool4", 1, 2, 1): (0, 2),
    ("pool2", 1, 1, 2): (1, 2),
}


@pytest.mark.parametrize("pool_name, tp, ep, etp", FINALIZE_CALLS)
def test_expert_lora_adds_no_collective(request, pool_name, tp, ep, etp):
    pool = request.getfixturevalue(pool_name)
    base = pool.run(jobs.collectives_job, tp, ep, "frozen_base", *_batch(), etp=etp)
    ours = pool.run(jobs.collectives_job, tp, ep, "lora", *_batch(), etp=etp)
    plain, averaged = FINALIZE_CALLS[(pool_name, tp, ep, etp)]
    for b, o in zip(base, ours):
        assert sum(b["step"].values()) > 0
        for op, n in o["step"].items():
            assert n <= b["step"].get(op, 0), f"{op}: adapted {n} > frozen base {b['step'].get(op, 0)}"
        assert o["finalize_dp0"] == ({"all_reduce": plain} if plain else {})
        assert o["finalize_dp1"] == {"all_reduce": averaged}


@pytest.mark.parametrize("pool_name, tp, ep, etp", [("pool2", 1, 2, 1), ("pool4", 2, 2, 2)])
def test_sharded_checkpoint_round_trips_expert_adapters(request, tmp_path, pool_name, tp, ep, etp):
    """save_checkpoint / load_checkpoint at the same layout: every rank gets back exactly the
    shards it saved, each EP rank its own experts (written by expert-DP rank 0 of each EP rank)."""
    pool = request.getfixturevalue(pool_name)
    ranks = pool.run(jobs.checkpoint_job, str(tmp_path / "ckpt"), ep, etp, tp)
    experts = set()
    for r in ranks:
        assert r["differed"] and all(r["equal"].values()), [n for n, ok in r["equal"].items() if not ok]
        experts |= {n.split(".")[6] for n in r["names"] if ".local_experts." in n}
    assert experts == {"0", "1", "2", "3"}


def _assert_same_logits(ranks, atol: float = 0.0):
    """The loaded model at its layout gives the saved model's logits (at the saving layout): the
    same float64 values on every rank (atol 0), or within `atol` where the layouts sum an expert's
    fc2 in another order (expert-TP 1 vs 2: measured 3e-16)."""
    for r in ranks:
        torch.testing.assert_close(r["loaded_logits"], r["saved_logits"], rtol=0, atol=atol)
        assert torch.equal(r["saved_logits"], ranks[0]["saved_logits"])


def test_checkpoint_saved_at_ep2_loads_at_ep1(pool2, tmp_path):
    """Names carry the global expert index, so EP 1 ranks find every expert's tensors in the
    files EP 2 wrote (expert-TP = TP = 1 on both sides), and give the EP 2 logits."""
    ranks = pool2.run(jobs.checkpoint_job, str(tmp_path / "ckpt"), 2, 1, 1, load_ep=1)
    for r in ranks:
        assert r["differed"] and all(r["equal"].values())
        assert {n.split(".")[6] for n in r["names"] if ".local_experts." in n} == {"0", "1", "2", "3"}
    _assert_same_logits(ranks)


@pytest.mark.parametrize("save_ep, load_ep", [(2, 4), (4, 2)])
def test_checkpoint_reshards_ep_on_four_ranks(pool4, tmp_path, save_ep, load_ep):
    """EP 2 -> EP 4 and back on four ranks: each loading rank gets exactly its own experts, and
    the model gives the saving layout's logits."""
    ranks = pool4.run(jobs.checkpoint_job, str(tmp_path / "ckpt"), save_ep, 1, 1, load_ep=load_ep)
    experts = set()
    for r in ranks:
        assert r["differed"] and all(r["equal"].values()), [n for n, ok in r["equal"].items() if not ok]
        experts |= {n.split(".")[6] for n in r["names"] if ".local_experts." in n}
    assert experts == {"0", "1", "2", "3"}
    _assert_same_logits(ranks)


@pytest.mark.parametrize("save_etp, load_etp", [(1, 2), (2, 1)])
def test_checkpoint_reshards_expert_tp_at_tp2(pool2, tmp_path, save_etp, load_etp):
    """TP 2 (SP) x EP 1: expert adapters saved at expert-TP 1 (ETP != TP: the index records their
    split size) load at expert-TP 2, and back; the same tensors and the saving layout's logits (to
    rounding: expert-TP 2 sums each expert's fc2 over two ranks)."""
    ranks = pool2.run(jobs.checkpoint_job, str(tmp_path / "ckpt"), 1, save_etp, 2, load_etp=load_etp)
    for r in ranks:
        assert r["differed"] and all(r["equal"].values()), [n for n, ok in r["equal"].items() if not ok]
    _assert_same_logits(ranks, atol=1e-14)
    _offline_expert_reshard(tmp_path / "ckpt", tmp_path, save_etp)


def _offline_expert_reshard(ckpt, tmp_path, saved_etp: int):
    """consolidate/reshard offline: to TP 1 x expert-TP 2 and TP 2 x expert-TP 1, the same full
    tensors; the index records the experts' split size where it is not tp_size."""
    import json

    from parallel_adapters.checkpoint.consolidate import consolidate, reshard

    full = consolidate(ckpt)
    index = json.loads((ckpt / "index.json").read_text())["tensors"]
    experts = [n for n in index if ".local_experts." in n]
    assert {index[n].get("split_size", 2) for n in experts} == {saved_etp}
    for tp, etp in ((1, 2), (2, 1)):
        out = reshard(ckpt, tmp_path / f"tp{tp}-etp{etp}", tp, progress=False, expert_tp_size=etp)
        entries = json.loads((out / "index.json").read_text())["tensors"]
        assert {entries[n].get("split_size", tp) for n in experts} == {etp}
        assert all(len(entries[n]["files"]) == etp for n in experts if "lora_B" in n and "linear_fc1" in n)
        again = consolidate(out)
        assert again.keys() == full.keys() and all(torch.equal(again[n], full[n]) for n in full)


@pytest.mark.parametrize("pool_name, tp, ep", [("pool2", 1, 2), ("pool4", 2, 2)])
def test_dora_on_experts_matches_world_one(request, pool_name, tp, ep):
    """DoRA through the same hosts at expert-TP 1 (its row norms need no reduction there)."""
    pool = request.getfixturevalue(pool_name)
    ref = request.getfixturevalue("pool2").run(jobs.train_job, 1, 1, 1, 1, *_batch(), use_dora=True)[0]
    assert any("lora_magnitude_vector" in n and "local_experts" in n for n in ref["adapter"])
    ranks = pool.run(jobs.train_job, tp, ep, 1, 1, *_batch(), sequence_parallel=tp > 1, use_dora=True)
    _assert_matches_reference(ranks, ref)


def test_dora_on_expert_row_layers_is_refused_at_expert_tp2(pool2):
    for message in pool2.run(jobs.dora_expert_etp_job):
        assert "local_experts" in message and "linear_fc2" in message and "reduction_payload" in message


ROUTER_LAYOUTS = {"ep2": ("pool2", (1, 2, 1, 1, False, 1)), "tp2-sp-ep2": ("pool4", (2, 2, 1, 1, True, 1))}


@pytest.fixture(scope="module")
def router_reference(pool2):
    return pool2.run(jobs.train_job, 1, 1, 1, 1, *_batch(), steps=3, modules_to_save=["router"])[0]


@pytest.mark.parametrize("layout", ROUTER_LAYOUTS)
def test_router_trained_through_modules_to_save_matches_world_one(request, router_reference, layout):
    """The router is not adapted by default (test_reference_adapts_every_expert_and_attention);
    modules_to_save=["router"] trains it.  It is replicated over every group; under sequence
    parallelism each TP rank routes its own slice of the tokens, so its gradient is partial over TP
    (Megatron marks it `sequence_parallel`) and finalize_grads sums it there, then averages it
    over DP as a dense tensor.  Losses, routers, adapters and the grad norm after three AdamW
    steps match world size 1."""
    pool_name, (tp, ep, etp, pp, sp, micro) = ROUTER_LAYOUTS[layout]
    ref = router_reference
    assert sorted(ref["saved"]) == [f"decoder.layers.{i}.mlp.router.weight" for i in range(2)]
    ranks = request.getfixturevalue(pool_name).run(jobs.train_job, tp, ep, etp, pp, *_batch(), sequence_parallel=sp,
                                                   num_microbatches=micro, steps=3, modules_to_save=["router"])
    for r in ranks:
        assert r["losses"] == pytest.approx(ref["losses"], rel=0, abs=TOL)
        assert r["grad_sumsq"] == pytest.approx(ref["grad_sumsq"], rel=1e-9)
        for name, full in ref["saved"].items():
            torch.testing.assert_close(r["saved"][name], full, rtol=0, atol=TOL, msg=name)
    adapter = _merged_adapter(ranks)
    for name, full in ref["adapter"].items():
        torch.testing.assert_close(adapter[name], full, rtol=0, atol=TOL, msg=name)
