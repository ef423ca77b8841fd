"""PromptTuningConfig: PEFT's fields for prompt tuning."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from parallel_adapters.config.common import (
    _check_positive_int, _known_fields,
)


PROMPT_TUNING_INITS = ("RANDOM", "TEXT", "SAMPLE_VOCAB")


@dataclass(frozen=True)
class PromptTuningConfig:
    """Prompt tuning (PEFT's `PromptTuningConfig`): `num_virtual_tokens` trainable embeddings
    prepended to every sequence (adapters/prompt.py)."""

    num_virtual_tokens: int = 20
    prompt_tuning_init: str = "RANDOM"
    """RANDOM (N(0, 1), as nn.Embedding), TEXT (the embeddings of the tokenised init text, cut or
    repeated to num_virtual_tokens) or SAMPLE_VOCAB (embeddings of random vocabulary rows)."""
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None
    init_token_ids: tuple[int, ...] | None = None
    """Not PEFT's: TEXT's tokenised text (interop.hf_tokenizer.prompt_init_token_ids fills it)."""
    token_dim: int | None = None
    num_transformer_submodules: int = 1
    num_attention_heads: int | None = None
    num_layers: int | None = None
    inference_mode: bool = False
    seed: int = 0
    """Seeds RANDOM and SAMPLE_VOCAB (PEFT draws from torch's global generator)."""
    peft_type: str = "PROMPT_TUNING"
    task_type: str = "CAUSAL_LM"

    def __post_init__(self) -> None:
        _check_positive_int("num_virtual_tokens", self.num_virtual_tokens, "PromptTuningConfig")
        if self.prompt_tuning_init not in PROMPT_TUNING_INITS:
            raise ValueError(f"PromptTuningConfig.prompt_tuning_init must be one of {PROMPT_TUNING_INITS}, "
                             f"got {self.prompt_tuning_init!r}")
        if self.prompt_tuning_init == "TEXT" and not self.prompt_tuning_init_text and self.init_token_ids is None:
            raise ValueError("PromptTuningConfig.prompt_tuning_init='TEXT' needs prompt_tuning_init_text")
        if self.num_transformer_submodules != 1 or self.task_type != "CAUSAL_LM":
            raise ValueError("PromptTuningConfig: only task_type='CAUSAL_LM' with num_transformer_submodules=1 "
                             f"(a decoder-only GPT), got {self.task_type!r} / {self.num_transformer_submodules}")
        if self.init_token_ids is not None:
            object.__setattr__(self, "init_token_ids", tuple(int(i) for i in self.init_token_ids))

    def replace(self, **changes: Any) -> "PromptTuningConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["init_token_ids"] = None if self.init_token_ids is None else list(self.init_token_ids)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "PromptTuningConfig":
        return cls(**_known_fields(cls, data))


ENCODER_TYPES = ("MLP", "LSTM")


@dataclass(frozen=True)
class PromptEncoderConfig:
    """P-tuning (PEFT's `PromptEncoderConfig`): `num_virtual_tokens` trainable embeddings passed
    through an encoder (MLP, or a bidirectional LSTM then an MLP) whose output is prepended to
    every sequence (adapters/p_tuning.py)."""

    num_virtual_tokens: int = 20
    encoder_hidden_size: int | None = None
    """Required (PEFT's default None builds no encoder)."""
    encoder_reparameterization_type: str = "MLP"
    encoder_num_layers: int = 2
    """LSTM layers (the MLP has three Linear layers whatever this says, as PEFT's)."""
    encoder_dropout: float = 0.0
    """Between LSTM layers (PEFT's MLP has no dropout)."""
    token_dim: int | None = None
    num_transformer_submodules: int = 1
    num_attention_heads: int | None = None
    num_layers: int | None = None
    inference_mode: bool = False
    seed: int = 0
    """Seeds the encoder's initial values (PEFT draws from torch's global generator)."""
    peft_type: str = "P_TUNING"
    task_type: str = "CAUSAL_LM"

    def __post_init__(self) -> None:
        owner = "PromptEncoderConfig"
        _check_positive_int("num_virtual_tokens", self.num_virtual_tokens, owner)
        if self.encoder_hidden_size is None:
            raise ValueError("PromptEncoderConfig.encoder_hidden_size is required (the encoder's hidden width)")
        _check_positive_int("encoder_hidden_size", self.encoder_hidden_size, owner)
        _check_positive_int("encoder_num_layers", self.encoder_num_layers, owner)
        if self.encoder_reparameterization_type not in ENCODER_TYPES:
            raise ValueError(f"PromptEncoderConfig.encoder_reparameterization_type must be one of {ENCODER_TYPES}, "
                             f"got {self.encoder_reparameterization_type!r}")
        if isinstance(self.encoder_dropout, bool) or not 0.0 <= self.encoder_dropout < 1.0:
            raise ValueError(f"PromptEncoderConfig.encoder_dropout must be in [0, 1), got {self.encoder_dropout!r}")
        if self.num_transformer_submodules != 1 or self.task_type != "CAUSAL_LM":
            raise ValueError("PromptEncoderConfig: only task_type='CAUSAL_LM' with num_transformer_submodules=1 "
                             f"(a decoder-only GPT), got {self.task_type!r} / {self.num_transformer_submodules}")

    def replace(self, **changes: Any) -> "PromptEncoderConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PromptEncoderConfig":
        return cls(**_known_fields(cls, data))
