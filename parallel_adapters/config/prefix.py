"""PrefixTuningConfig: PEFT's fields for prefix tuning."""
from __future__ import annotations

from dataclasses import dataclass

from parallel_adapters.config.common import _check_positive_int
from parallel_adapters.config.prompt import PromptLearningConfig

PREFIX_INIT_WEIGHTS = (None, "zero")


@dataclass(frozen=True)
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning (PEFT's `PrefixTuningConfig`): `num_virtual_tokens` trained key/value pairs
    in every attention layer, seen by every real token as a cache (adapters/prefix.py).
    Model-decided (PEFT's GQA rule): token_dim is KV heads x head_dim, num_attention_heads the
    KV heads, num_layers the transformer layers."""

    encoder_hidden_size: int | None = None
    """The MLP's hidden width with prefix_projection; None means token_dim, as PEFT."""
    prefix_projection: bool = False
    """Compute the prefix with PEFT's MLP (Embedding, Linear, Tanh, Linear) instead of training it directly."""
    init_weights: str | None = None
    """None: N(0, 1) table (torch's Linear init in the MLP), "zero": a no-op start, as PEFT."""
    peft_type: str = "PREFIX_TUNING"

    def _check_kind_fields(self, owner: str) -> None:
        for name in ("encoder_hidden_size", "token_dim", "num_attention_heads", "num_layers"):
            if getattr(self, name) is not None:
                _check_positive_int(name, getattr(self, name), owner)
        if not isinstance(self.prefix_projection, bool):
            raise ValueError(f"PrefixTuningConfig.prefix_projection must be a bool, got {self.prefix_projection!r}")
        if self.init_weights not in PREFIX_INIT_WEIGHTS:
            raise ValueError(f"PrefixTuningConfig.init_weights must be one of {PREFIX_INIT_WEIGHTS}, "
                             f"got {self.init_weights!r}")
