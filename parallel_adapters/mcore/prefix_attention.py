"""Prefix keys and values in Megatron's attention, the way transformers attends to a cache
(PEFT's prefix tuning hands its prefix over as `past_key_values`).

Legend: n prefix positions, s real positions (the whole sequence: under sequence parallelism
linear_qkv has gathered it before attention), b batch, g KV groups of this TP rank, d head_dim.

Two forward pre-hooks, nothing else of the model changes:
- on every layer's `self_attention.core_attention` (DotProductAttention): key/value [s, b, g, d]
  become [n + s, b, g, d] with the prefix first, and the mask lets every real query see all n
  prefix keys and the real keys up to itself.  The prefix is a cache: it is NOT rotated (RoPE
  was applied to the real keys before this point) and skips k_layernorm, as in transformers.
- on the GPTModel's `rotary_pos_emb`: RoPE's positions start at n, so real token i sits at
  n + i (transformers' cache_position after an n-long cache).
Each TP rank's layer holds only its g KV groups, so it prepends only their prefix: no
collective.  The prefix joins inside core attention, after the sequence gather, so sequence
parallelism sees no change in the activations it splits.
"""
from __future__ import annotations

from typing import Callable

import torch
from megatron.core import parallel_state
from megatron.core.transformer.dot_product_attention import DotProductAttention

LayerPrefix = Callable[[int], "torch.Tensor | None"]
"""global layer index -> this rank's prefix of that layer [n, 2, g * d] (keys, values), or None."""


def prepend_prefix(key_sbgd: torch.Tensor, value_sbgd: torch.Tensor,
                   prefix_n2x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) [n + s, b, g, d]: the prefix's (the same for every sequence) then the layer's."""
    n, (b, g, d) = prefix_n2x.shape[0], key_sbgd.shape[1:]
    if prefix_n2x.shape[2] != g * d:
        raise ValueError(f"prefix of {prefix_n2x.shape[2]} columns for {g} KV groups x head_dim {d} on this rank")
    kv = prefix_n2x.to(key_sbgd.dtype).reshape(n, 2, 1, g, d).expand(n, 2, b, g, d)
    return torch.cat([kv[:, 0], key_sbgd], dim=0), torch.cat([kv[:, 1], value_sbgd], dim=0)


def prefix_mask(mask: torch.Tensor | None, sq: int, n: int, device: torch.device) -> torch.Tensor:
    """Megatron's boolean mask (True: masked) over [n + sq] keys: nothing masked on the n prefix
    columns; causal over the real ones, or the given mask [..., sq, sq] there."""
    if mask is None:
        mask = torch.ones(sq, sq, dtype=torch.bool, device=device).triu(diagonal=1)
    return torch.cat([mask.new_zeros((*mask.shape[:-1], n)), mask], dim=-1)


def install_prefix_hooks(model: torch.nn.Module, layer_prefix: LayerPrefix,
                         offset: Callable[[], int]) -> list:
    """Hooks on this stage's attention layers and RoPE (see the module docstring); returns the handles.
    `offset()` is the number of prefix positions of the forward now (0: the base model)."""
    if getattr(model, "position_embedding_type", None) != "rope":
        raise ValueError("PrefixTuningConfig: the model must use rotary positions (position_embedding_type='rope'), "
                         f"got {getattr(model, 'position_embedding_type', None)!r}")
    handles = [model.rotary_pos_emb.register_forward_pre_hook(_rope_hook(offset), with_kwargs=True)]
    for layer in getattr(getattr(model, "decoder", None), "layers", []):
        core = layer.self_attention.core_attention
        if not isinstance(core, DotProductAttention):
            raise ValueError(f"PrefixTuningConfig: layer {layer.layer_number} uses {type(core).__name__}; prefix "
                             "tuning hooks Megatron's local DotProductAttention (the local layer spec)")
        handles.append(core.register_forward_pre_hook(_attention_hook(layer.layer_number - 1, layer_prefix),
                                                      with_kwargs=True))
    return handles


def _rope_hook(offset: Callable[[], int]):
    def hook(module, args, kwargs):
        n = offset()
        return None if n == 0 else (args, {**kwargs, "offset": n})
    return hook


def _attention_hook(layer: int, layer_prefix: LayerPrefix):
    def hook(module, args, kwargs):
        prefix = layer_prefix(layer)
        if prefix is None:
            return None
        query, key, value = args[:3]
        key, value = prepend_prefix(key, value, prefix)
        if len(args) > 3:
            mask = prefix_mask(args[3], query.shape[0], prefix.shape[0], query.device)
            return (query, key, value, mask, *args[4:]), kwargs
        mask = prefix_mask(kwargs.get("attention_mask"), query.shape[0], prefix.shape[0], query.device)
        return (query, key, value), {**kwargs, "attention_mask": mask}
    return hook


def model_parallel_group():
    """Megatron's TP x PP group: where a tensor replicated on every stage and TP rank has partial gradients."""
    return parallel_state.get_model_parallel_group()
