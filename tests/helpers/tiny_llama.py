"""A tiny Hugging Face Llama (and Qwen2, Qwen3, Qwen3-MoE, Mixtral) with an awkward shape, saved
locally (no download).

Awkward on purpose, so that a wrong layout cannot pass by symmetry: grouped-query attention
(4 heads, 2 KV heads, head_dim 12 -> hidden 48, not a power of two), vocab 101 (no TP size
divides it, so Megatron pads), intermediate 80, perturbed (not all-ones) norm weights, non-default
RoPE theta and RMS eps.  Weights are drawn larger than Llama's default init so that every layer
moves the logits.
"""
from __future__ import annotations

from pathlib import Path

import torch

TINY = dict(vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=12, rms_norm_eps=3e-6, rope_theta=5e4, max_position_embeddings=64,
            initializer_range=0.08)


def _save_perturbed(model_cls, config, directory: str | Path, seed: int, **save_kwargs) -> Path:
    """Build `model_cls(config)` from `seed`, draw the norms around 1 and any biases non-zero
    (so a bias left out or misplaced moves the logits), save_pretrained (safetensors, float32)."""
    out = Path(directory)
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.3 * torch.randn(param.shape, generator=g))
            elif name.endswith(".bias"):
                param.copy_(0.5 * torch.randn(param.shape, generator=g))
            elif name.endswith("mlp.gate.weight"):  # a MoE router: logits ~ 3 apart, no near-ties
                param.copy_(0.5 * torch.randn(param.shape, generator=g))
    model.save_pretrained(out, **save_kwargs)
    return out


TINY_TP3 = TINY | dict(num_attention_heads=12, num_key_value_heads=6, head_dim=4, intermediate_size=96)
"""The same kind of shape with KV groups and FFN width that split over TP=2 and TP=3 (Megatron needs the
KV groups to be a multiple or a divisor of TP)."""


def make_tiny_llama(directory: str | Path, tie: bool = False, seed: int = 0, max_shard_size: str | None = None,
                    **shape) -> Path:
    """A tiny LlamaForCausalLM (TINY, with `shape` overriding its fields); `max_shard_size`
    (e.g. "40KB") saves it as shards + model.safetensors.index.json."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(tie_word_embeddings=tie, **(TINY | shape))
    return _save_perturbed(LlamaForCausalLM, config, directory, seed,
                           **({"max_shard_size": max_shard_size} if max_shard_size else {}))


def make_tiny_qwen2(directory: str | Path, seed: int = 0, **shape) -> Path:
    """The same awkward shape as a Qwen2ForCausalLM: biases on q/k/v, none elsewhere."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(tie_word_embeddings=False, use_sliding_window=False, **(TINY | shape))
    return _save_perturbed(Qwen2ForCausalLM, config, directory, seed)


QWEN3 = TINY | dict(head_dim=16)
"""head_dim 16 with hidden 48 and 4 heads: not hidden / heads (Qwen3 sets it freely)."""
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=24)


def make_tiny_qwen3(directory: str | Path, seed: int = 0, **shape) -> Path:
    """A tiny Qwen3ForCausalLM: RMSNorm over head_dim on every query / key head (q_norm, k_norm)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(tie_word_embeddings=False, use_sliding_window=False, **(QWEN3 | shape))
    return _save_perturbed(Qwen3ForCausalLM, config, directory, seed)


def make_tiny_qwen3_moe(directory: str | Path, seed: int = 0, norm_topk_prob: bool = False, **shape) -> Path:
    """A tiny Qwen3MoeForCausalLM: Qwen3 attention, every MLP 4 experts (top-2, 24 wide)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(tie_word_embeddings=False, use_sliding_window=False, num_experts=4,
                            norm_topk_prob=norm_topk_prob, **(QWEN3 | MOE | shape))
    return _save_perturbed(Qwen3MoeForCausalLM, config, directory, seed)


def make_tiny_mixtral(directory: str | Path, seed: int = 0, **shape) -> Path:
    """A tiny MixtralForCausalLM: Llama attention, every MLP 4 experts (top-2, intermediate 24)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    fields = TINY | dict(intermediate_size=MOE["moe_intermediate_size"], num_local_experts=4,
                         num_experts_per_tok=MOE["num_experts_per_tok"])
    config = MixtralConfig(tie_word_embeddings=False, **(fields | shape))
    return _save_perturbed(MixtralForCausalLM, config, directory, seed)


def hf_routing(hf_dir: str | Path, input_ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """layer -> (bool map [batch, seq, experts], routing probabilities [batch, seq, experts]) of
    the saved MoE model's routers (transformers' `mlp.gate`)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(layer, module, args, output):
        logits, scores, indices = output
        probs = torch.zeros_like(logits).scatter(1, indices, scores.to(logits.dtype))
        shape = (*input_ids.shape, logits.shape[-1])
        out[layer] = (probs.ne(0).reshape(shape), probs.reshape(shape))

    handles = [layer.mlp.gate.register_forward_hook(lambda m, a, o, i=i: hook(i, m, a, o))
               for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(input_ids=input_ids)
    for h in handles:
        h.remove()
    return out


def hf_logits(hf_dir: str | Path, input_ids: torch.Tensor) -> torch.Tensor:
    """float32 logits of the saved model (eval mode, causal, no attention mask)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


def sample_ids(batch: int = 2, seq: int = 12, vocab: int = 101, seed: int = 5) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
