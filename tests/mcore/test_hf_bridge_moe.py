"""Hugging Face Qwen3, Qwen3-MoE and Mixtral -> Megatron GPT (q/k norms, routed experts).

Oracle: transformers' own model on the same file.  The Megatron model built by
`gpt_settings_from_hf` + `import_hf_checkpoint` must give its logits (float32, 1e-4) and route
every token to the same experts with the same probabilities, at TP 2 x EP 2 (4 ranks, sequence
parallel, ETP = TP: each expert split inside like a dense MLP), TP 2 x EP 2 x ETP 1 and TP 1 x EP 2; each rank must
read exactly its own slices (its experts only).  `export_hf_checkpoint` (experts gathered over
ETP, then over EP) must give back the original tensors bit for bit, with a config.json derived
from the model that transformers loads to the same logits.  Megatron computes the router's softmax in
float32 whatever the model dtype (`topk_routing_with_score_function`), as transformers does.
The layouts are checked on one process against explicit constructions.
"""
import pytest
import torch

from parallel_adapters.hf import mapping as L
from parallel_adapters.hf.config import LlamaShape, read_hf_config
from parallel_adapters.hf.files import HFCheckpoint
from tests.helpers.tiny_llama import (
    hf_logits, hf_routing, make_tiny_mixtral, make_tiny_qwen3, make_tiny_qwen3_moe, sample_ids,
)
from tests.mcore import hf_moe_jobs as jobs

IDS = sample_ids()


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return make_tiny_qwen3(tmp_path_factory.mktemp("hf") / "qwen3")


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory):
    return make_tiny_qwen3_moe(tmp_path_factory.mktemp("hf") / "qwen3_moe", seed=2)


@pytest.fixture(scope="module")
def qwen3_moe_norm(tmp_path_factory):
    return make_tiny_qwen3_moe(tmp_path_factory.mktemp("hf") / "qwen3_moe_norm", seed=3, norm_topk_prob=True)


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return make_tiny_mixtral(tmp_path_factory.mktemp("hf") / "mixtral", seed=4)


def _state(hf_dir):
    ckpt = HFCheckpoint(hf_dir)
    return {n: ckpt.read(n) for n in ckpt.names()}


def _shape(hf_dir):
    return LlamaShape.from_config(read_hf_config(hf_dir))


# ----------------------------------------------------------------------------------------------
# Pure layout (one process)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fixture", ["qwen3", "qwen3_moe", "mixtral"])
def test_round_trip_is_exact_and_names_match_the_checkpoint(request, fixture):
    hf_dir = request.getfixturevalue(fixture)
    hf, shape = _state(hf_dir), _shape(hf_dir)
    assert set(L.expected_hf_shapes(shape)) == set(hf)
    megatron = L.hf_to_megatron_state_dict(hf, shape, padded_vocab=104)
    back = L.megatron_to_hf_state_dict(megatron, shape)
    assert back.keys() == hf.keys()
    assert all(torch.equal(back[n], hf[n]) for n in hf)


@pytest.mark.parametrize("fixture, block, gate, up, down", [
    ("qwen3_moe", "mlp", "gate_proj", "up_proj", "down_proj"),
    ("mixtral", "block_sparse_moe", "w1", "w3", "w2"),
])
def test_expert_router_and_qk_norm_layouts(request, fixture, block, gate, up, down):
    hf_dir = request.getfixturevalue(fixture)
    hf, shape = _state(hf_dir), _shape(hf_dir)
    megatron = L.hf_to_megatron_state_dict(hf, shape)
    p, m = "model.layers.1.", "decoder.layers.1."
    assert torch.equal(megatron[m + "mlp.router.weight"], hf[p + f"{block}.gate.weight"])
    for e in range(4):
        x = f"{p}{block}.experts.{e}."
        fc1 = torch.cat([hf[x + gate + ".weight"], hf[x + up + ".weight"]])
        assert torch.equal(megatron[f"{m}mlp.experts.local_experts.{e}.linear_fc1.weight"], fc1)
        assert torch.equal(megatron[f"{m}mlp.experts.local_experts.{e}.linear_fc2.weight"], hf[x + down + ".weight"])
    assert not any(".mlp.linear_fc1" in n for n in megatron)
    assert (m + "self_attention.q_layernorm.weight" in megatron) == (fixture == "qwen3_moe")
    if fixture == "qwen3_moe":
        assert torch.equal(megatron[m + "self_attention.k_layernorm.weight"], hf[p + "self_attn.k_norm.weight"])


def test_config_fields_are_read(qwen3, qwen3_moe, qwen3_moe_norm, mixtral):
    q3 = _shape(qwen3)
    assert (q3.qk_norm, q3.head_dim, q3.hidden_size, q3.num_experts, q3.qkv_bias) == (True, 16, 48, 0, False)
    moe = _shape(qwen3_moe)
    assert (moe.num_experts, moe.moe_topk, moe.moe_intermediate_size, moe.norm_topk_prob) == (4, 2, 24, False)
    assert _shape(qwen3_moe_norm).norm_topk_prob
    mx = _shape(mixtral)
    assert (mx.qk_norm, mx.num_experts, mx.moe_intermediate_size, mx.norm_topk_prob) == (False, 4, 24, True)
    cfg = read_hf_config(qwen3_moe)
    spelled = {k: v for k, v in cfg.items() if k != "num_local_experts"} | {"num_experts": 4}
    assert LlamaShape.from_config(spelled) == moe  # the Hub's spelling of the expert count


@pytest.mark.parametrize("fixture, change, field", [
    ("qwen3_moe", {"decoder_sparse_step": 2}, "decoder_sparse_step"),
    ("qwen3_moe", {"mlp_only_layers": [0]}, "mlp_only_layers"),
    ("qwen3_moe", {"num_experts_per_tok": 5}, "num_experts_per_tok"),
    ("qwen3_moe", {"moe_intermediate_size": None}, "moe_intermediate_size"),
    ("mixtral", {"router_jitter_noise": 0.1}, "router_jitter_noise"),
    ("qwen3", {"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 16}, "sliding_window"),
    ("qwen3", {"attention_bias": True}, "attention_bias"),
])
def test_unsupported_configs_are_refused_by_name(request, fixture, change, field):
    cfg = read_hf_config(request.getfixturevalue(fixture)) | change
    with pytest.raises(ValueError, match=field):
        LlamaShape.from_config(cfg)


@pytest.mark.parametrize("config_class, missing", [
    ("OlmoeConfig", r"'olmoe' is not supported .*q_norm / k_norm are RMSNorms over the whole query"),
    ("GptOssConfig", r"'gpt_oss' is not supported .*attention sinks"),
])
def test_olmoe_and_gpt_oss_are_refused_naming_what_is_missing(tmp_path, config_class, missing):
    """The two other MoE families transformers 5 ships: their config.json (tiny, as transformers
    saves it) is refused by model_type, with what the Qwen3-MoE / Mixtral code lacks for them."""
    import transformers

    getattr(transformers, config_class)(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=missing):
        LlamaShape.from_config(read_hf_config(tmp_path))


def test_expert_adapters_map_to_the_saved_per_expert_modules(qwen3_moe):
    """The offline merge's targets; the PEFT export packs them into the fused parameters instead
    (tests/integration/test_peft_export_experts.py)."""
    from parallel_adapters.checkpoint.hf_adapter import adapter_hf_modules

    shape = _shape(qwen3_moe)
    assert adapter_hf_modules("decoder.layers.0.self_attention.linear_qkv", shape)[0].endswith("q_proj")
    assert adapter_hf_modules("decoder.layers.0.mlp.experts.local_experts.1.linear_fc1", shape) == (
        "model.layers.0.mlp.experts.1.gate_proj", "model.layers.0.mlp.experts.1.up_proj")
    assert adapter_hf_modules("decoder.layers.1.mlp.experts.local_experts.3.linear_fc2", shape) == (
        "model.layers.1.mlp.experts.3.down_proj",)


def test_settings_route_as_transformers(qwen3_moe, qwen3_moe_norm, mixtral):
    from parallel_adapters.mcore.hf_bridge import gpt_settings_from_hf

    s = gpt_settings_from_hf(qwen3_moe)
    assert (s.num_moe_experts, s.moe_router_topk, s.moe_ffn_hidden_size) == (4, 2, 24)
    assert s.moe_router_pre_softmax and s.qk_layernorm  # norm_topk_prob=false: softmax over all, then top-k
    assert not gpt_settings_from_hf(qwen3_moe_norm).moe_router_pre_softmax
    assert not gpt_settings_from_hf(mixtral).moe_router_pre_softmax


# ----------------------------------------------------------------------------------------------
# Megatron parity on real ranks
# ----------------------------------------------------------------------------------------------

def _padding_elements(tp_rank, tp, hidden, vocab=101, padded=104):
    rows = padded // tp
    lo, hi = tp_rank * rows, (tp_rank + 1) * rows
    return max(0, hi - max(lo, vocab)) * hidden * 2  # embedding and output layer


def _check_export(export, hf_dir, reference):
    original, exported = _state(hf_dir), _state(export)
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[n], original[n]) for n in original)
    assert _shape(export) == _shape(hf_dir)
    torch.testing.assert_close(hf_logits(export, IDS), reference, atol=1e-6, rtol=0)


def _check(results, hf_dir, tp, moe=True, export=None):
    reference = hf_logits(hf_dir, IDS)
    if export is not None:
        _check_export(export, hf_dir, reference)
    routing = hf_routing(hf_dir, IDS) if moe else {}
    seq = IDS.shape[1]
    for r in results:
        torch.testing.assert_close(r["logits"], reference, atol=1e-4, rtol=0)
        pad = _padding_elements(r["tp_rank"], tp, r["hidden"])
        assert r["elements_read"] == r["elements_held"] - pad, "each rank must read exactly its own slices"
        assert set(r["routing"]) == set(routing)
        lo, hi = r["tp_rank"] * seq // tp, (r["tp_rank"] + 1) * seq // tp  # this rank's SP slice
        for layer, (hf_map, hf_probs) in routing.items():
            got_map, got_probs = r["routing"][layer]
            assert torch.equal(got_map.bool(), hf_map.transpose(0, 1)[lo:hi]), layer
            # float32: the router input differs from transformers by summation order (~1e-6)
            torch.testing.assert_close(got_probs, hf_probs.transpose(0, 1)[lo:hi], atol=1e-5, rtol=0)
    if moe:
        experts = {n.split("local_experts.")[1].split(".")[0] for r in results for n in r["param_names"]
                   if r["ep_rank"] == 1 and "local_experts" in n}
        assert experts == {"0", "1"}  # two local experts per EP rank (global 2, 3 on EP rank 1)


@pytest.mark.parametrize("tp", [1, 2])
def test_qwen3_matches_transformers_and_round_trips(pool2, qwen3, tp, tmp_path):
    export = tmp_path / "export"
    results = pool2.run(jobs.import_job, str(qwen3), tp, 1, IDS, None, str(export))
    assert results[0]["settings"]["qk_layernorm"] and results[0]["settings"]["kv_channels"] == 16
    _check(results, qwen3, tp, moe=False, export=export)


@pytest.mark.parametrize("fixture", ["qwen3_moe", "qwen3_moe_norm", "mixtral"])
def test_moe_matches_transformers_and_round_trips_at_tp2_ep2(request, pool4, fixture, tmp_path):
    hf_dir, export = request.getfixturevalue(fixture), tmp_path / "export"
    results = pool4.run(jobs.import_job, str(hf_dir), 2, 2, IDS, None, str(export))
    assert results[0]["settings"]["sequence_parallel"]
    _check(results, hf_dir, 2, export=export)


def test_moe_with_unsplit_experts_at_tp2_ep2_etp1(pool4, qwen3_moe, tmp_path):
    """ETP 1: every expert whole on its EP rank while attention is split over TP 2."""
    export = tmp_path / "export"
    results = pool4.run(jobs.import_job, str(qwen3_moe), 2, 2, IDS, 1, str(export), False)
    _check(results, qwen3_moe, 2, export=export)
    assert read_hf_config(export) == read_hf_config(qwen3_moe)  # copied, not derived


@pytest.mark.parametrize("fixture", ["qwen3_moe", "mixtral"])
def test_moe_matches_transformers_and_round_trips_at_tp1_ep2(request, pool2, fixture, tmp_path):
    hf_dir, export = request.getfixturevalue(fixture), tmp_path / "export"
    _check(pool2.run(jobs.import_job, str(hf_dir), 1, 2, IDS, None, str(export)), hf_dir, 1, export=export)


def test_mixtral_pipeline_parallel_import_and_per_stage_export(pool4, mixtral, tmp_path):
    """PP 2 x EP 2: each stage reads its layers' local experts; each stage writes its own files."""
    export = tmp_path / "export"
    results = pool4.run(jobs.import_job, str(mixtral), 1, 2, IDS, None, str(export), True, 2)
    reference = hf_logits(mixtral, IDS)
    for r in results:
        if r["pp_rank"] == 0:
            assert r["logits"] is None and set(r["routing"]) == {0}
        else:
            torch.testing.assert_close(r["logits"], reference, atol=1e-4, rtol=0)
            assert set(r["routing"]) == {1}
    assert (export / "model.safetensors.index.json").is_file()
    _check_export(export, mixtral, reference)
