"""Torch norms for megatron's local layer spec that also work under sequence parallelism.

megatron's `WrappedTorchNorm` (the local spec's norm without TE/Apex) asserts
`not config.sequence_parallel`, yet a norm is a per-token op and needs nothing from the other
ranks in forward.  What SP does need is bookkeeping: each rank sees only its slice of the
sequence, so the norm weight's gradient is a partial sum over TP.  Megatron finds such weights
by `param.sequence_parallel = True` and all-reduces their grads over TP in
`finalize_model_grads`; we mark them the same way (do it yourself if you do not use it).
"""
from __future__ import annotations

import torch
from megatron.core.transformer import TransformerConfig


def _mark_sequence_parallel(module: torch.nn.Module, config: TransformerConfig) -> None:
    for param in module.parameters():
        setattr(param, "sequence_parallel", bool(config.sequence_parallel))


class SequenceParallelNorm:
    """Drop-in for `WrappedTorchNorm` (same constructor) that accepts sequence parallelism.

    Returns a `torch.nn.RMSNorm` or `torch.nn.LayerNorm` (chosen by `config.normalization`, as
    megatron does), so parameter names and numerics are those of the local spec."""

    def __new__(
        cls,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "LayerNorm",
    ) -> torch.nn.Module:
        if config.layernorm_zero_centered_gamma:
            raise ValueError("layernorm_zero_centered_gamma is not supported by torch norms")
        if config.normalization == "RMSNorm":
            norm: torch.nn.Module = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            raise ValueError(f"normalization={config.normalization!r}: expected 'RMSNorm' or 'LayerNorm'")
        _mark_sequence_parallel(norm, config)
        return norm
