"""A tiny GGUF Llama written with the `gguf` package, laid out the way llama.cpp's converter writes
SmolLM2's file (no download):

- metadata under llama.cpp's key names, tied embeddings (no `output.weight`), q/k rows permuted
  into llama.cpp's rotary order;
- layer 0 and the norms in F32 (they must come back bit for bit), the token embedding in Q8_0 and
  layer 1 in Q4_1 (they must come back as their de-quantised values);
- a byte-level BPE tokenizer ("gpt2", like SmolLM2's): three control tokens, the 256 byte symbols,
  and a few merges that spell "the" and " river".
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, rms_norm_eps=3e-6, rope_theta=5e4, max_position_embeddings=64, initializer_range=0.08)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["t h", "th e", "r i", "ri v", "riv e", "rive r", "Ġ river"]
SHAPE_TP3 = SHAPE | dict(hidden_size=96, intermediate_size=192, num_attention_heads=6, num_key_value_heads=3)
"""Head counts like SmolLM2's (3 KV groups): they split over TP=3 only."""
QUANTISED_LAYER = 1


def byte_symbols() -> list[str]:
    """GPT-2's printable spelling of the 256 bytes, in byte order."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spelling = bytes_to_unicode()
    return [spelling[b] for b in range(256)]


def vocabulary() -> list[str]:
    return SPECIAL + byte_symbols() + [m.replace(" ", "") for m in MERGES]


def permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order (convert_hf_to_gguf.LlamaModel.permute)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def _gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    layer, module = hf_name.removeprefix("model.layers.").removesuffix(".weight").split(".", 1)
    return f"blk.{layer}.{_GGUF_NAMES[module]}.weight"


def _qtype(hf_name: str):
    from gguf import GGMLQuantizationType as Q

    if hf_name == "model.embed_tokens.weight":
        return Q.Q8_0
    if hf_name.startswith(f"model.layers.{QUANTISED_LAYER}.") and "norm" not in hf_name:
        return Q.Q4_1
    return Q.F32


def make_tiny_gguf(directory: str | Path, shape: dict | None = None) -> Path:
    """`directory`/tiny.Q4_1.gguf, written from a tiny tied HF Llama of `shape` (default SHAPE)."""
    from transformers import LlamaForCausalLM

    from tests.helpers.tiny_llama import make_tiny_llama

    directory = Path(directory)
    hf_dir = make_tiny_llama(directory / "hf", tie=True, **(shape or SHAPE), vocab_size=len(vocabulary()))
    write_tiny_gguf(LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32), directory / "tiny.Q4_1.gguf")
    return directory / "tiny.Q4_1.gguf"


def write_tiny_gguf(hf_model, path: str | Path, name: str = "Tiny Llama") -> dict[str, torch.Tensor]:
    """Write `hf_model` (a tied LlamaForCausalLM over `vocabulary()`) as a GGUF file; returns the
    HF-named tensors a correct conversion must give back (F32 exact, the rest de-quantised)."""
    import gguf

    cfg = hf_model.config
    vocab = vocabulary()
    assert cfg.vocab_size == len(vocab) and cfg.tie_word_embeddings
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(len(vocab))
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(vocab)
    writer.add_token_types([3] * len(SPECIAL) + [1] * (len(vocab) - len(SPECIAL)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    expected = {}
    for hf_name, param in hf_model.state_dict().items():
        if hf_name == "lm_head.weight":
            continue  # tied: GGUF stores the embedding once
        w = param.detach().float()
        heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}.get(hf_name.split(".")[-2])
        stored = permute(w, heads) if heads else w
        qtype = _qtype(hf_name)
        data = gguf.quants.quantize(stored.numpy(), qtype)
        writer.add_tensor(_gguf_name(hf_name), data, raw_dtype=qtype)
        back = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(data, qtype))).float().reshape(w.shape)
        expected[hf_name] = unpermute(back, heads) if heads else back
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected
