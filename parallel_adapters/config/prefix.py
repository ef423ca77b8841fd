"""PrefixTuningConfig: PEFT's fields for prefix tuning."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from parallel_adapters.config.common import _check_positive_int, _known_fields

PREFIX_INIT_WEIGHTS = (None, "zero")


@dataclass(frozen=True)
class PrefixTuningConfig:
    """Prefix tuning (PEFT's `PrefixTuningConfig`): `num_virtual_tokens` trained key/value pairs
    in every attention layer, seen by every real token as a cache (adapters/prefix.py)."""

    num_virtual_tokens: int = 20
    encoder_hidden_size: int | None = None
    """The MLP's hidden width with prefix_projection; None means token_dim, as PEFT."""
    prefix_projection: bool = False
    """Compute the prefix with PEFT's MLP (Embedding, Linear, Tanh, Linear) instead of training it directly."""
    init_weights: str | None = None
    """None: N(0, 1) table (torch's Linear init in the MLP), "zero": a no-op start, as PEFT."""
    token_dim: int | None = None
    """Model-decided: KV heads x head_dim (PEFT's GQA rule); a value given must match the model."""
    num_transformer_submodules: int = 1
    num_attention_heads: int | None = None
    """Model-decided: the KV heads (PEFT's GQA rule); a value given must match the model."""
    num_layers: int | None = None
    """Model-decided: the transformer layers; a value given must match the model."""
    inference_mode: bool = False
    seed: int = 0
    """Seeds the initial values (PEFT draws from torch's global generator)."""
    peft_type: str = "PREFIX_TUNING"
    task_type: str = "CAUSAL_LM"

    def __post_init__(self) -> None:
        owner = "PrefixTuningConfig"
        _check_positive_int("num_virtual_tokens", self.num_virtual_tokens, owner)
        for name in ("encoder_hidden_size", "token_dim", "num_attention_heads", "num_layers"):
            if getattr(self, name) is not None:
                _check_positive_int(name, getattr(self, name), owner)
        if not isinstance(self.prefix_projection, bool):
            raise ValueError(f"PrefixTuningConfig.prefix_projection must be a bool, got {self.prefix_projection!r}")
        if self.init_weights not in PREFIX_INIT_WEIGHTS:
            raise ValueError(f"PrefixTuningConfig.init_weights must be one of {PREFIX_INIT_WEIGHTS}, "
                             f"got {self.init_weights!r}")
        if self.num_transformer_submodules != 1 or self.task_type != "CAUSAL_LM":
            raise ValueError("PrefixTuningConfig: only task_type='CAUSAL_LM' with num_transformer_submodules=1 "
                             f"(a decoder-only GPT), got {self.task_type!r} / {self.num_transformer_submodules}")

    def replace(self, **changes: Any) -> "PrefixTuningConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PrefixTuningConfig":
        return cls(**_known_fields(cls, data))
