"""PromptTuningConfig and PromptEncoderConfig: PEFT's fields for prompt tuning and P-tuning,
and the fields every prompt-learning config shares (PrefixTuningConfig's too)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

from parallel_adapters.config.common import (
    _check_positive_int, _known_fields,
)

_Config = TypeVar("_Config", bound="PromptLearningConfig")

PROMPT_TUNING_INITS = ("RANDOM", "TEXT", "SAMPLE_VOCAB")


@dataclass(frozen=True)
class PromptLearningConfig:
    """PEFT's `PromptLearningConfig` fields.  token_dim, num_attention_heads and num_layers are
    decided by the model (a value given must match it); only a decoder-only GPT is served."""

    num_virtual_tokens: int = 20
    token_dim: int | None = None
    num_transformer_submodules: int = 1
    num_attention_heads: int | None = None
    num_layers: int | None = None
    inference_mode: bool = False
    seed: int = 0
    """Seeds the initial values (PEFT draws from torch's global generator)."""
    peft_type: str = ""
    task_type: str = "CAUSAL_LM"

    def __post_init__(self) -> None:
        owner = type(self).__name__
        _check_positive_int("num_virtual_tokens", self.num_virtual_tokens, owner)
        self._check_kind_fields(owner)
        if self.num_transformer_submodules != 1 or self.task_type != "CAUSAL_LM":
            raise ValueError(f"{owner}: only task_type='CAUSAL_LM' with num_transformer_submodules=1 "
                             f"(a decoder-only GPT), got {self.task_type!r} / {self.num_transformer_submodules}")

    def _check_kind_fields(self, owner: str) -> None:
        """The subclass's own checks, run after num_virtual_tokens's."""

    def replace(self: _Config, **changes: Any) -> _Config:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[_Config], data: dict) -> _Config:
        return cls(**_known_fields(cls, data))


@dataclass(frozen=True)
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning (PEFT's `PromptTuningConfig`): `num_virtual_tokens` trainable embeddings
    prepended to every sequence (adapters/prompt.py).  `seed` seeds RANDOM and SAMPLE_VOCAB."""

    prompt_tuning_init: str = "RANDOM"
    """RANDOM (N(0, 1), as nn.Embedding), TEXT (the embeddings of the tokenised init text, cut or
    repeated to num_virtual_tokens) or SAMPLE_VOCAB (embeddings of random vocabulary rows)."""
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None
    init_token_ids: tuple[int, ...] | None = None
    """Not PEFT's: TEXT's tokenised text (interop.hf_tokenizer.prompt_init_token_ids fills it)."""
    peft_type: str = "PROMPT_TUNING"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_token_ids is not None:
            object.__setattr__(self, "init_token_ids", tuple(int(i) for i in self.init_token_ids))

    def _check_kind_fields(self, owner: str) -> None:
        if self.prompt_tuning_init not in PROMPT_TUNING_INITS:
            raise ValueError(f"PromptTuningConfig.prompt_tuning_init must be one of {PROMPT_TUNING_INITS}, "
                             f"got {self.prompt_tuning_init!r}")
        if self.prompt_tuning_init == "TEXT" and not self.prompt_tuning_init_text and self.init_token_ids is None:
            raise ValueError("PromptTuningConfig.prompt_tuning_init='TEXT' needs prompt_tuning_init_text")

    def to_dict(self) -> dict:
        data = super().to_dict()
        data["init_token_ids"] = None if self.init_token_ids is None else list(self.init_token_ids)
        return data


ENCODER_TYPES = ("MLP", "LSTM")


@dataclass(frozen=True)
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning (PEFT's `PromptEncoderConfig`): `num_virtual_tokens` trainable embeddings passed
    through an encoder (MLP, or a bidirectional LSTM then an MLP) whose output is prepended to
    every sequence (adapters/p_tuning.py).  `seed` seeds the encoder's initial values."""

    encoder_hidden_size: int | None = None
    """Required (PEFT's default None builds no encoder)."""
    encoder_reparameterization_type: str = "MLP"
    encoder_num_layers: int = 2
    """LSTM layers (the MLP has three Linear layers whatever this says, as PEFT's)."""
    encoder_dropout: float = 0.0
    """Between LSTM layers (PEFT's MLP has no dropout)."""
    peft_type: str = "P_TUNING"

    def _check_kind_fields(self, owner: str) -> None:
        if self.encoder_hidden_size is None:
            raise ValueError("PromptEncoderConfig.encoder_hidden_size is required (the encoder's hidden width)")
        _check_positive_int("encoder_hidden_size", self.encoder_hidden_size, owner)
        _check_positive_int("encoder_num_layers", self.encoder_num_layers, owner)
        if self.encoder_reparameterization_type not in ENCODER_TYPES:
            raise ValueError(f"PromptEncoderConfig.encoder_reparameterization_type must be one of {ENCODER_TYPES}, "
                             f"got {self.encoder_reparameterization_type!r}")
        if isinstance(self.encoder_dropout, bool) or not 0.0 <= self.encoder_dropout < 1.0:
            raise ValueError(f"PromptEncoderConfig.encoder_dropout must be in [0, 1), got {self.encoder_dropout!r}")
