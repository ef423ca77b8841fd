"""Prefix tuning's PEFT layout and encoder, without megatron (the offline export uses them too).

PEFT's table [n, 2 L D] (n virtual tokens, L layers, D = KV heads x head_dim): layer l's keys
are columns [2l D, (2l+1) D), its values [(2l+1) D, (2l+2) D), each group-major.  With
prefix_projection PEFT computes the table with an MLP and saves the MLP's output.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

PEFT_KEY = "prompt_embeddings"
"""PEFT's key of the [n, 2 L D] table in adapter_model.safetensors."""
_PEFT_FIELDS = ("num_virtual_tokens", "encoder_hidden_size", "prefix_projection", "init_weights")


def layer_columns(layer: int, token_dim: int, tp_size: int, tp_rank: int) -> torch.Tensor:
    """The columns of PEFT's [n, 2 L D] table that layer `layer`'s keys then values of TP rank
    `tp_rank`'s KV groups occupy (2 D/t of them, in [keys | values] order)."""
    width = token_dim // tp_size
    starts = [(2 * layer + part) * token_dim + tp_rank * width for part in (0, 1)]
    return torch.cat([torch.arange(s, s + width) for s in starts])


class PrefixEncoder(nn.Module):
    """PEFT's prefix_projection MLP; the tensor names are PEFT's (embedding.weight, transform.0.weight, ...)."""

    def __init__(self, num_virtual_tokens: int, token_dim: int, hidden: int, num_layers: int):
        super().__init__()
        self.embedding = nn.Embedding(num_virtual_tokens, token_dim)
        self.transform = nn.Sequential(nn.Linear(token_dim, hidden), nn.Tanh(),
                                       nn.Linear(hidden, num_layers * 2 * token_dim))

    def forward(self, columns: torch.Tensor | None = None) -> torch.Tensor:
        """The table's `columns` [n, len(columns)] (all [n, 2 L D] when None)."""
        hidden = self.transform[1](self.transform[0](self.embedding.weight))
        out = self.transform[2]
        if columns is None:
            return out(hidden)
        return F.linear(hidden, out.weight.index_select(0, columns), out.bias.index_select(0, columns))


def peft_table(layers: Mapping[int, torch.Tensor]) -> torch.Tensor:
    """PEFT's [n, 2 L D] from every layer's [n, 2, D] (keys, values), layers 0..L-1."""
    missing = sorted(set(range(len(layers))) ^ set(layers))
    if missing:
        raise ValueError(f"prefix tables of layers {sorted(layers)}: not 0..{len(layers) - 1} (check {missing})")
    stacked = torch.stack([layers[l] for l in range(len(layers))], dim=1)  # [n, L, 2, D]
    return stacked.reshape(stacked.shape[0], -1)


@torch.no_grad()
def encoded_table(tensors: Mapping[str, torch.Tensor], num_layers: int) -> torch.Tensor:
    """The [n, 2 L D] that an encoder with these tensors (PEFT's names) produces, in float64:
    what PEFT saves for a prefix_projection adapter."""
    n, token_dim = tensors["embedding.weight"].shape
    encoder = PrefixEncoder(n, token_dim, tensors["transform.0.weight"].shape[0], num_layers).to(torch.float64)
    encoder.load_state_dict({k: v.to(torch.float64) for k, v in tensors.items()}, strict=True)
    return encoder()


def peft_config_fields(config: Mapping[str, Any], table_shape: tuple, kv_heads: int, num_layers: int,
                       base_model_name_or_path: str | None) -> dict:
    """adapter_config.json in PEFT's PrefixTuningConfig fields for a table [n, 2 L D] (what
    PEFT's own save writes: inference_mode true, the model-decided fields under its GQA rule)."""
    n, width = table_shape
    token_dim = width // (2 * num_layers)
    if width != 2 * num_layers * token_dim or config.get("num_virtual_tokens", n) != n:
        raise ValueError(f"a prefix table {list(table_shape)} does not fit num_virtual_tokens="
                         f"{config.get('num_virtual_tokens')} and {num_layers} layers")
    data = {k: config.get(k) for k in _PEFT_FIELDS}
    data.update(num_virtual_tokens=n, token_dim=token_dim, num_attention_heads=kv_heads, num_layers=num_layers,
                encoder_hidden_size=data["encoder_hidden_size"] or token_dim,
                prefix_projection=bool(data["prefix_projection"]),
                num_transformer_submodules=1, peft_type="PREFIX_TUNING", task_type="CAUSAL_LM",
                base_model_name_or_path=base_model_name_or_path, inference_mode=True, revision=None,
                modules_to_save=None, auto_mapping=None)
    return data
