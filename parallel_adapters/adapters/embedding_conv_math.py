"""Pure LoRA math on lookup tables and on conv2d, as PEFT's LoRA `Embedding` and `Conv2d` compute it.

Embedding (PEFT's `lora_embedding_A` / `lora_embedding_B`): table W [V, H], A [r, V], B [H, r];
    y = lookup(W, ids) + s lookup(A^T, ids) B^T,  delta W = s (B A)^T  [V, H].
Under TP (VocabParallelEmbedding, rows of W split over ranks) A is split with them (dim 1) and B
is replicated; a rank's lookup of its A shard is partial exactly as its lookup of W is.

Conv2d: W [O, I, kh, kw], A [r, I, kh, kw] (the base's window), B [O, r, 1, 1];
    y = conv(x, W) + b + s conv1x1(conv(drop(x), A), B),
    delta W = s B A for a 1x1 kernel, else s (conv(A^T, B))^T (the composition of the two convs).
"""
from __future__ import annotations

from typing import Callable, Union

import torch
import torch.nn.functional as F

from parallel_adapters.adapters.functional import init_lora_factors
from parallel_adapters.distributed.sharding import REPLICATED, ShardSpec
from parallel_adapters.distributed.geometry import ConvShape


def lora_embedding_specs(parallel_mode: str) -> tuple[ShardSpec, ShardSpec]:
    """(spec of A, spec of B): A follows the table's row split (vocab-parallel), B replicated."""
    if parallel_mode == "vocab":
        return ShardSpec(dim=1), REPLICATED
    if parallel_mode == "embedding":
        return REPLICATED, REPLICATED
    raise ValueError(f"not an embedding parallel_mode: {parallel_mode!r}")


def init_lora_embedding(vocab: int, width: int, r: int, init: Union[bool, str],
                        generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Full float64 A [r, V], B [H, r] as PEFT initialises an embedding's LoRA: A = 0 and
    B ~ N(0, 1) (nn.Embedding's default), so the adapter starts as a no-op; with
    init_lora_weights=False both ~ N(0, 1)."""
    b = torch.randn(width, r, dtype=torch.float64, generator=generator)
    if init is False:
        return torch.randn(r, vocab, dtype=torch.float64, generator=generator), b
    return torch.zeros(r, vocab, dtype=torch.float64), b


def lora_embed_down(ids: torch.Tensor, a: torch.Tensor, dtype: torch.dtype,
                    padding_idx: int | None = None) -> torch.Tensor:
    """z = lookup(A^T, ids): [...] -> [..., r], in the activations' dtype."""
    return F.embedding(ids, a.to(dtype).t(), padding_idx)


def lora_embedding_delta(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """s (B A)^T [V, H] (a table shard's rows for an A shard), in float32 or wider."""
    compute = torch.promote_types(a.dtype, torch.float32)
    return (b.to(compute) @ a.to(compute)).t() * scaling


def init_lora_conv(out_channels: int, in_channels: int, conv: ConvShape, r: int, init: Union[bool, str],
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Full float64 A [r, I, kh, kw], B [O, r, 1, 1], drawn as for a linear layer whose fan-in is
    I kh kw (what nn.Conv2d's default init and PEFT's Kaiming-uniform use)."""
    kernel = conv.kernel_size
    fan_in = in_channels * kernel[0] * kernel[1]
    a, b = init_lora_factors(out_channels, fan_in, r, init, generator, torch.float64)
    return a.reshape(r, in_channels, *kernel), b.reshape(out_channels, r, 1, 1)


def lora_conv_down(x: torch.Tensor, a: torch.Tensor, conv: ConvShape,
                   dropout: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """z = conv(drop(x), A) with the base's stride and padding: [N, I, h, w] -> [N, r, h', w']."""
    return F.conv2d(dropout(x) if dropout is not None else x, a.to(x.dtype), None, conv.stride, conv.padding)


def add_lora_conv_up(y: torch.Tensor, z: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """y + s conv1x1(z, B)."""
    return torch.add(y, F.conv2d(z, b.to(z.dtype)), alpha=scaling)


def lora_conv_delta(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """The kernel update [O, I, kh, kw] equivalent to conv A then conv1x1 B, in float32 or wider."""
    compute = torch.promote_types(a.dtype, torch.float32)
    a, b = a.to(compute), b.to(compute)
    if a.shape[2:] == (1, 1):
        return (b.flatten(1) @ a.flatten(1))[:, :, None, None] * scaling
    return F.conv2d(a.transpose(0, 1), b).transpose(0, 1) * scaling
