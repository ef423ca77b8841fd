"""interop.gguf.convert_gguf on a tiny GGUF Llama written by the test (tests/helpers/tiny_gguf.py).

Oracles: the HF model the GGUF file was written from (F32 tensors, q/k un-permuted, must come back
bit for bit; Q8_0 / Q4_1 tensors must come back as the `gguf` package's de-quantisation of what was
written), the config it had, and the BPE merges the file holds (the tokenizer must apply them).
"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from parallel_adapters.interop.gguf import SOURCE_RECORD, convert_gguf
from tests.helpers.tiny_gguf import QUANTISED_LAYER, SHAPE, vocabulary, write_tiny_gguf
from tests.helpers.tiny_llama import make_tiny_llama


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("gguf")
    hf_dir = make_tiny_llama(root / "hf", tie=True, **SHAPE, vocab_size=len(vocabulary()))
    original = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    expected = write_tiny_gguf(original, root / "tiny.Q4_1.gguf")
    out = convert_gguf(root / "tiny.Q4_1.gguf", root / "converted")
    return {"root": root, "original": original, "expected": expected, "out": out}


def test_tensors_come_back_unpermuted_and_dequantised(converted):
    got = load_file(str(converted["out"] / "model.safetensors"))
    original = converted["original"].state_dict()
    assert set(got) - {"lm_head.weight"} == set(converted["expected"])
    exact = [n for n in got if n.startswith("model.layers.0.") or "norm" in n]
    assert any("q_proj" in n for n in exact) and any("k_proj" in n for n in exact)
    for name in exact:
        assert torch.equal(got[name], original[name]), name
    quantised = [n for n in got if n.startswith(f"model.layers.{QUANTISED_LAYER}.") and "norm" not in n]
    for name in quantised + ["model.embed_tokens.weight"]:
        assert got[name].dtype == torch.float32
        torch.testing.assert_close(got[name], converted["expected"][name], atol=1e-6, rtol=0)
        assert not torch.equal(got[name], original[name]), f"{name} should carry the quantisation error"


def test_config_is_a_plain_llama_without_the_gguf_quantisation(converted):
    config = json.loads((converted["out"] / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim"):
        assert config[key] == SHAPE[key], key
    assert config["vocab_size"] == len(vocabulary())
    assert config["rms_norm_eps"] == pytest.approx(SHAPE["rms_norm_eps"], rel=1e-6)  # stored as float32
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)

    from parallel_adapters.hf.config import LlamaShape, read_hf_config

    shape = LlamaShape.from_config(read_hf_config(converted["out"]), "config.json")
    assert (shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.rope_theta) == (4, 2, 16, 5e4)
    assert shape.tie_word_embeddings


def test_converted_model_loads_as_an_ordinary_checkpoint(converted):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(converted["out"], dtype=torch.float32).eval()
    assert getattr(model.config, "quantization_config", None) is None
    reference = LlamaForCausalLM(converted["original"].config).eval()
    reference.load_state_dict(converted["expected"], strict=False)
    reference.tie_weights()
    ids = torch.randint(0, len(vocabulary()), (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_tokenizer_applies_the_files_merges_and_special_tokens(converted):
    from parallel_adapters.interop.hf_tokenizer import load_hf_tokenizer

    encode, eos, size = load_hf_tokenizer(converted["out"])
    vocab = {t: i for i, t in enumerate(vocabulary())}
    assert (eos, size) == (2, len(vocab))
    assert encode("the river") == [vocab["the"], vocab["Ġriver"]]
    assert encode("the<|im_end|>") == [vocab["the"], 2]
    assert encode("tx") == [vocab["t"], vocab["x"]]


def test_second_call_reuses_the_conversion_and_refuses_another_file(converted, tmp_path):
    out, gguf_file = converted["out"], converted["root"] / "tiny.Q4_1.gguf"
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert convert_gguf(gguf_file, out) == out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert json.loads((out / SOURCE_RECORD).read_text())["file"] == "tiny.Q4_1.gguf"
    other = tmp_path / "other.gguf"
    other.write_bytes(gguf_file.read_bytes())
    with pytest.raises(ValueError, match="holds a conversion of 'tiny.Q4_1.gguf'"):
        convert_gguf(other, out)
    with pytest.raises(ValueError, match="does not exist"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "x")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not an empty directory"):
        convert_gguf(gguf_file, tmp_path / "busy")
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name], os.listdir(out.parent)
