"""P-tuning's prompt encoder (PEFT's P_TUNING): the virtual tokens' rows come out of a small
network instead of being trained directly.

    rows = mlp_head(E)                      MLP:  Linear(H, h), ReLU, Linear(h, h), ReLU, Linear(h, H)
    rows = mlp_head(lstm_head(E))           LSTM: bidirectional LSTM(H, h, encoder_num_layers) then
                                                  Linear(2h, 2h), ReLU, Linear(2h, H)

E [n, H] is the encoder's own embedding table (one row per virtual token, in order), h the
encoder_hidden_size.  The tensor names are PEFT's (embedding.weight, mlp_head.0.weight,
lstm_head.weight_ih_l0, ...), so a PEFT encoder's state_dict loads as is.

Where it runs (adapters/prompt.py): on the first pipeline stage, replicated over TP, once per
forward; its n rows take the place of prompt tuning's table.  Under sequence parallelism each TP
rank uses only its chunk's rows, so the encoder's gradients are per-rank partials that
finalize_grads sums over TP (the same one all-reduce as prompt tuning's table).
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from parallel_adapters.config import PromptEncoderConfig


class PromptEncoder(nn.Module):
    """The encoder of one P-tuning adapter; `forward()` returns its n rows [n, H]."""

    def __init__(self, config: PromptEncoderConfig, token_dim: int):
        super().__init__()
        n, h = config.num_virtual_tokens, config.encoder_hidden_size
        self.lstm = config.encoder_reparameterization_type == "LSTM"
        self.embedding = nn.Embedding(n, token_dim)
        if self.lstm:
            self.lstm_head = nn.LSTM(token_dim, h, num_layers=config.encoder_num_layers,
                                     dropout=config.encoder_dropout if config.encoder_num_layers > 1 else 0.0,
                                     bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, token_dim))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(token_dim, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
                                          nn.Linear(h, token_dim))

    def forward(self) -> torch.Tensor:
        rows = self.embedding.weight
        if self.lstm:
            rows = self.lstm_head(rows.unsqueeze(0))[0].squeeze(0)  # one sequence of the n virtual tokens
        return self.mlp_head(rows)


def build_encoder(config: PromptEncoderConfig, token_dim: int, device: torch.device | str) -> PromptEncoder:
    """A new encoder in float32, its initial values drawn from `config.seed` (the same on every
    TP rank: it is replicated) with torch's default inits, as PEFT's (nn.Embedding N(0, 1),
    nn.Linear / nn.LSTM uniform)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        encoder = PromptEncoder(config, token_dim)
    for param in encoder.parameters():
        param.adapter_tensor = True  # not a base weight (mcore.hf_bridge skips it)
    return encoder.to(device=device, dtype=torch.float32)


@torch.no_grad()
def encoded_rows(config: PromptEncoderConfig, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The n rows [n, H] that an encoder with these tensors (its state_dict names) produces: what
    PEFT saves as a P-tuning adapter's `prompt_embeddings` (offline, for the export)."""
    token_dim = tensors["embedding.weight"].shape[1]
    encoder = PromptEncoder(config, token_dim).to(torch.float64).eval()
    missing, unexpected = encoder.load_state_dict({k: v.to(torch.float64) for k, v in tensors.items()}, strict=False)
    if missing or unexpected:
        raise ValueError(f"P-tuning encoder tensors: missing {missing}, unexpected {unexpected}")
    return encoder()


PEFT_FIELDS = ("encoder_reparameterization_type", "encoder_hidden_size", "encoder_num_layers", "encoder_dropout")
"""PromptEncoderConfig's own fields in PEFT's adapter_config.json (the rest are prompt learning's)."""


def peft_config_fields(config: Mapping, prompt_fields: dict) -> dict:
    """adapter_config.json of a P-tuning adapter: the prompt-learning fields (prompt.peft_config_fields)
    without prompt tuning's init ones, with PEFT's PromptEncoderConfig fields from `config`."""
    data = {k: v for k, v in prompt_fields.items() if not k.startswith(("prompt_tuning_init", "tokenizer_"))}
    data.update({k: config[k] for k in PEFT_FIELDS}, peft_type="P_TUNING")
    return data

