"""What an adapter needs to know about the frozen layer it wraps, as plain data (no megatron import:
adapter kinds and the offline tools use it; `mcore.compat.linear_geometry` fills it from a layer)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

LINEAR_MODES = ("column", "row", "replicated")
EMBEDDING_MODES = ("vocab", "embedding")
"""Lookup tables: Megatron's VocabParallelEmbedding (rows split over TP) and a plain nn.Embedding."""


@dataclass(frozen=True)
class ConvShape:
    """A plain nn.Conv2d's window, which an adapter's down-projection reuses (as PEFT's LoRA does)."""

    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: Any
    dilation: tuple[int, ...]
    groups: int


@dataclass(frozen=True)
class LinearGeometry:
    """What an adapter needs to know about the frozen layer it wraps (a linear layer, an embedding
    table or a conv2d: a weight mapping `in_features` to `out_features`)."""

    parallel_mode: str
    """"column", "row" or "replicated" (a plain nn.Linear); "vocab" (VocabParallelEmbedding),
    "embedding" (nn.Embedding), "conv2d" (nn.Conv2d)."""
    in_features: int
    """Global input size (an embedding's vocabulary, padded as Megatron pads it; a conv's in-channels)."""
    out_features: int
    """Global output size (an embedding's width; a conv's out-channels)."""
    chunks: int
    """Megatron's partition_stride of the weight (2 for SwiGLU fc1)."""
    tp_group: Any
    tp_size: int
    tp_rank: int
    sequence_parallel: bool
    gather_output: bool
    input_is_parallel: bool
    skip_bias_add: bool
    padding_idx: int | None = None
    """nn.Embedding's padding row (no gradient flows into it)."""
    conv: ConvShape | None = None
    """nn.Conv2d's window."""
    vocab_size: int | None = None
    """A padded table's real vocabulary (Megatron's word embedding): rows past it are padding."""
    expert: bool = False
    """A routed MoE expert's layer (Megatron's `is_expert`): tp_group/size/rank are the EXPERT
    tensor-parallel group's, and the layer issues no collective of its own (Megatron's
    `explicit_expert_comm`: the token dispatcher all-gathers its input and reduce-scatters its
    output over expert-TP x EP), so a host runs local math only and adds nothing either."""
    attention: tuple[int, int, int] | None = None
    """(attention heads, query groups, head size) of the Megatron model the layer belongs to, where
    known: how a fused linear_qkv's rows divide into q/k/v (adapter kinds that scale parts of them)."""
