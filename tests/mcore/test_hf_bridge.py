"""Hugging Face Llama <-> Megatron GPT bridge.

Oracle: transformers' own LlamaForCausalLM on the same file.  The Megatron model built by
`gpt_settings_from_hf` + `import_hf_checkpoint` must give its logits (fp32, 1e-4) at TP=1 (DP=2),
TP=2, TP=2 with tied embeddings read from a sharded checkpoint, and PP=2; each rank must read
exactly its own slices; `export_hf_checkpoint` must give back the original tensors bit for bit.
The layout functions are checked on one process against explicit constructions.
"""
import json

import pytest
import torch
from safetensors.torch import load_file

from parallel_adapters.checkpoint.layout import CheckpointError
from parallel_adapters.distributed.sharding import ShardSpec
from parallel_adapters.hf import mapping as L
from parallel_adapters.hf.config import LlamaShape, read_hf_config
from parallel_adapters.hf.files import HFCheckpoint
from tests.helpers.tiny_llama import hf_logits, make_tiny_llama, make_tiny_qwen2, sample_ids
from tests.mcore import hf_jobs

IDS = sample_ids()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("hf") / "tiny")


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory):
    return make_tiny_qwen2(tmp_path_factory.mktemp("hf") / "qwen2")


@pytest.fixture(scope="module")
def tiny_tied_sharded(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("hf") / "tied", tie=True, seed=1, max_shard_size="40KB")


def _state(hf_dir):
    ckpt = HFCheckpoint(hf_dir)
    return {n: ckpt.read(n) for n in ckpt.names()}


def _shape(hf_dir):
    return LlamaShape.from_config(read_hf_config(hf_dir))


# ----------------------------------------------------------------------------------------------
# Pure layout (one process)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fixture", ["tiny", "tiny_tied_sharded"])
def test_hf_megatron_hf_round_trip_is_exact(request, fixture):
    hf_dir = request.getfixturevalue(fixture)
    hf, shape = _state(hf_dir), _shape(hf_dir)
    megatron = L.hf_to_megatron_state_dict(hf, shape, padded_vocab=104)
    assert megatron["embedding.word_embeddings.weight"].shape == (104, 48)
    assert torch.count_nonzero(megatron["embedding.word_embeddings.weight"][101:]) == 0
    assert ("output_layer.weight" in megatron) != shape.tie_word_embeddings
    back = L.megatron_to_hf_state_dict(megatron, shape)
    assert back.keys() == hf.keys()
    for name in hf:
        assert torch.equal(back[name], hf[name]), name


def test_qkv_and_fc1_layouts_match_explicit_construction(tiny):
    hf, shape = _state(tiny), _shape(tiny)
    megatron = L.hf_to_megatron_state_dict(hf, shape)
    p = "model.layers.1."
    q, k, v = (hf[p + f"self_attn.{n}_proj.weight"] for n in "qkv")
    hd, qpg = shape.head_dim, shape.heads_per_group
    groups = [torch.cat([q[g * qpg * hd:(g + 1) * qpg * hd], k[g * hd:(g + 1) * hd], v[g * hd:(g + 1) * hd]])
              for g in range(shape.num_kv_heads)]
    assert torch.equal(megatron["decoder.layers.1.self_attention.linear_qkv.weight"], torch.cat(groups))
    fc1 = torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]])
    assert torch.equal(megatron["decoder.layers.1.mlp.linear_fc1.weight"], fc1)
    assert torch.equal(megatron["decoder.layers.1.pre_mlp_layernorm.weight"], hf[p + "post_attention_layernorm.weight"])


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_local_reads_equal_the_megatron_shard(tiny, tp):
    """What a rank reads by slices is exactly ShardSpec.shard of the full Megatron tensor (at TP=4
    a rank holds half a query group: Megatron slices linear_qkv contiguously then)."""
    hf, shape = _state(tiny), _shape(tiny)
    full = L.hf_to_megatron_state_dict(hf, shape, padded_vocab=104)
    specs = {"embedding.word_embeddings.weight": ShardSpec(0), "output_layer.weight": ShardSpec(0),
             "decoder.layers.0.self_attention.linear_qkv.weight": ShardSpec(0),
             "decoder.layers.0.self_attention.linear_proj.weight": ShardSpec(1),
             "decoder.layers.0.mlp.linear_fc1.weight": ShardSpec(0, chunks=2),
             "decoder.layers.0.mlp.linear_fc2.weight": ShardSpec(1),
             "decoder.layers.0.input_layernorm.weight": ShardSpec()}
    read = L.dict_reader(hf)
    for name, spec in specs.items():
        for rank in range(tp):
            rows, cols = L.local_ranges(spec, full[name].shape, rank, tp)
            got = L.hf_to_megatron_tensor(name, read, shape, full[name].shape[0], rows, cols)
            assert torch.equal(got, spec.shard(full[name], rank, tp)), (name, rank)


def test_config_fields_are_read(tiny):
    cfg = read_hf_config(tiny)
    assert "rope_parameters" in cfg and "rope_theta" not in cfg  # transformers 5 layout
    shape = LlamaShape.from_config(cfg)
    assert (shape.rope_theta, shape.rms_norm_eps, shape.head_dim, shape.num_kv_heads) == (5e4, 3e-6, 12, 2)
    legacy = {k: v for k, v in cfg.items() if k != "rope_parameters"} | {"rope_theta": 123.0, "rope_scaling": None}
    assert LlamaShape.from_config(legacy).rope_theta == 123.0


@pytest.mark.parametrize("change, field", [
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0}}, "rope_parameters"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"sliding_window": 16}, "sliding_window"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "gemma"}, "model_type"),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 16}, "sliding_window"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
])
def test_unsupported_configs_are_refused_by_name(tiny, change, field):
    cfg = read_hf_config(tiny) | change
    with pytest.raises(ValueError, match=field):
        LlamaShape.from_config(cfg)


def test_checkpoint_that_contradicts_its_config_names_tensor_and_file(tiny, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(cfg | {"intermediate_size": 96}))
    ckpt = HFCheckpoint(bad)
    with pytest.raises(CheckpointError, match=r"gate_proj.weight' in model.safetensors has shape \[80, 48\]"):
        ckpt.check_shapes(L.expected_hf_shapes(_shape(bad)))


# ----------------------------------------------------------------------------------------------
# Megatron parity on real ranks
# ----------------------------------------------------------------------------------------------

def _padding_elements(tp_rank, tp, hidden, vocab_tensors, vocab=101, padded=104):
    rows = padded // tp
    lo, hi = tp_rank * rows, (tp_rank + 1) * rows
    return max(0, hi - max(lo, vocab)) * hidden * vocab_tensors


@pytest.mark.parametrize("tp", [1, 2])
def test_imported_gpt_matches_transformers_logits(pool2, tiny, tmp_path, tp):
    export = tmp_path / "export"
    results = pool2.run(hf_jobs.import_job, str(tiny), tp, 1, IDS, str(export) if tp == 2 else None)
    reference = hf_logits(tiny, IDS)
    for r in results:
        torch.testing.assert_close(r["logits"], reference, atol=1e-4, rtol=0)
        assert r["settings"]["rotary_base"] == 5e4 and r["settings"]["kv_channels"] == 12
        pad = _padding_elements(r["tp_rank"], tp, r["hidden"], vocab_tensors=2)
        assert r["elements_read"] == r["elements_held"] - pad, "each rank must read exactly its own slices"
        derived = LlamaShape.from_config(r["derived_config"])
        assert derived == _shape(tiny)
    if tp == 2:
        original, exported = _state(tiny), load_file(str(export / "model.safetensors"))
        assert exported.keys() == original.keys()
        for name in original:
            assert torch.equal(exported[name], original[name]), name
        assert read_hf_config(export) == read_hf_config(tiny)


def test_import_needs_no_init_and_sets_every_weight(pool2, tiny):
    """build_gpt(init_weights=False) skips both inits; the import alone must give the same model."""
    inited = pool2.run(hf_jobs.import_job, str(tiny), 2, 1, IDS)
    bare = pool2.run(hf_jobs.import_job, str(tiny), 2, 1, IDS, init_weights=False)
    for a, b in zip(inited, bare):
        assert a["params"].keys() == b["params"].keys()
        for name in a["params"]:
            assert torch.equal(a["params"][name], b["params"][name]), name
        assert torch.equal(a["logits"], b["logits"])


def test_tied_embeddings_from_sharded_checkpoint_at_tp2(pool2, tiny_tied_sharded):
    assert (tiny_tied_sharded / "model.safetensors.index.json").is_file()
    assert "lm_head.weight" not in HFCheckpoint(tiny_tied_sharded).names()
    results = pool2.run(hf_jobs.import_job, str(tiny_tied_sharded), 2, 1, IDS)
    reference = hf_logits(tiny_tied_sharded, IDS)
    for r in results:
        torch.testing.assert_close(r["logits"], reference, atol=1e-4, rtol=0)
        assert r["settings"]["tie_embeddings"] is True
        assert r["elements_read"] == r["elements_held"] - _padding_elements(r["tp_rank"], 2, 48, 1)


def test_pipeline_parallel_import_and_per_stage_export(pool2, tiny, tmp_path):
    export = tmp_path / "pp_export"
    results = pool2.run(hf_jobs.import_job, str(tiny), 1, 2, IDS, str(export), False)
    assert results[0]["logits"] is None
    torch.testing.assert_close(results[1]["logits"], hf_logits(tiny, IDS), atol=1e-4, rtol=0)
    index = json.loads((export / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert index["weight_map"]["model.embed_tokens.weight"] == files[0]
    assert index["weight_map"]["lm_head.weight"] == files[1]
    original, exported = _state(tiny), _state(export)
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[n], original[n]) for n in original)
    assert LlamaShape.from_config(read_hf_config(export)) == _shape(tiny)  # derived from the model


def test_import_into_a_model_of_other_shape_is_refused(pool2, tiny):
    message = pool2.run(hf_jobs.mismatch_job, str(tiny))[0]
    assert "ffn_hidden_size / intermediate_size: model 96, Hugging Face 80" in message


@pytest.mark.parametrize("tp", [1, 2])
def test_qwen2_with_qkv_biases_matches_transformers_and_round_trips(pool2, tiny_qwen2, tmp_path, tp):
    """Qwen2: Llama's layers plus biases on q/k/v, which go into linear_qkv's bias with the
    weight's per-group row layout."""
    shape = _shape(tiny_qwen2)
    assert shape.qkv_bias and "model.layers.1.self_attn.k_proj.bias" in L.expected_hf_shapes(shape)
    export = tmp_path / "export"
    derived = tp == 2  # config.json derived from the model (hf_config_from_model), not copied
    results = pool2.run(hf_jobs.import_job, str(tiny_qwen2), tp, 1, IDS, str(export), not derived)
    reference = hf_logits(tiny_qwen2, IDS)
    torch.testing.assert_close(hf_logits(export, IDS), reference, atol=1e-5, rtol=0)  # transformers reads it back
    for r in results:
        torch.testing.assert_close(r["logits"], reference, atol=1e-4, rtol=0)
        assert r["settings"]["add_qkv_bias"] and r["derived_config"]["model_type"] == "qwen2"
        assert "decoder.layers.0.self_attention.linear_qkv.bias" in r["params"]
    original, exported = _state(tiny_qwen2), load_file(str(export / "model.safetensors"))
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[n], original[n]) for n in original)
