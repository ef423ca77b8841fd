"""Pure LoRA math: the sharding rule, initialisation of the full factors, the adapter path, and
merging.

Shapes: x [..., I], A [r, I], B [O, r], W [O, I].  Everything here works on whole tensors or on
one rank's shards alike (`lora_factor_specs` says which factor is split how), and never
communicates.
"""
from __future__ import annotations

import math
import zlib
from typing import Callable, Union

import torch
import torch.nn.functional as F

from parallel_adapters.distributed.sharding import REPLICATED, ShardSpec


def lora_factor_specs(parallel_mode: str, base_chunks: int = 1) -> tuple[ShardSpec, ShardSpec]:
    """(spec of A, spec of B) for an adapter on a base layer of the given parallel mode: the
    adapter sharding rule (docs/design.md section 4), stated once.

        column-parallel base  W_i [O/t, I]:  A replicated [r, I],     B_i [O/t, r] split like W (dim 0)
        row-parallel base     W_i [O, I/t]:  A_i [r, I/t] split like W (dim 1),  B replicated [O, r]

    "column": A replicated, B mirrors the output shard.  "row": A mirrors the input shard, B
    replicated.  "replicated" (a plain nn.Linear): both replicated.  `base_chunks` is the base
    weight's partition_stride (2 for SwiGLU fc1), which the split factor inherits.
    """
    if parallel_mode == "column":
        return REPLICATED, ShardSpec(dim=0, chunks=base_chunks)
    if parallel_mode == "row":
        return ShardSpec(dim=1, chunks=base_chunks), REPLICATED
    if parallel_mode == "replicated":
        return REPLICATED, REPLICATED
    raise ValueError(f"unknown parallel_mode {parallel_mode!r}; expected 'column', 'row' or 'replicated'")


def factor_seed(seed: int, *names: str) -> int:
    """A stable 63-bit seed from a base seed and names (module path, adapter name).

    Python's hash() is salted per process; crc32 is identical on every rank and every run.
    """
    value = seed & 0xFFFFFFFF
    for name in names:
        value = (value * 1_000_003) ^ zlib.crc32(name.encode())
    return value & 0x7FFF_FFFF_FFFF_FFFF


def init_lora_factors(
    out_features: int,
    in_features: int,
    r: int,
    init: Union[bool, str],
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full (unsharded) A [r, I] and B [O, r], drawn on CPU from `generator` as PEFT would.

    True / "eva": A ~ U(+-1/sqrt(I)) (Kaiming-uniform with a=sqrt(5), nn.Linear's default), B = 0.
    "gaussian":   A ~ N(0, (1/r)^2), B = 0.
    False:        A ~ U(+-1/sqrt(I)), B ~ U(+-1/sqrt(r))  (the adapter is not a no-op).
    Drawing the full matrices and sharding afterwards makes TP=1 and TP=k start identically.
    """
    a = torch.empty(r, in_features, dtype=torch.float64)
    if init == "gaussian":
        a.normal_(0.0, 1.0 / r, generator=generator)
    else:
        bound = 1.0 / math.sqrt(in_features)
        a.uniform_(-bound, bound, generator=generator)
    b = torch.zeros(out_features, r, dtype=torch.float64)
    if init is False:
        bound = 1.0 / math.sqrt(r)
        b.uniform_(-bound, bound, generator=generator)
    return a.to(dtype), b.to(dtype)


# The factors may be kept wider than the activations (float32 factors on a bfloat16 base): they
# are cast to the activations' dtype where they are used, so the matmuls, the collectives and the
# output keep the base's dtype while the optimizer updates float32 weights (the cast is a no-op
# when the dtypes agree; its backward casts the gradient back up).

def lora_down(x: torch.Tensor, a: torch.Tensor, dropout: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """z = drop(x) A^T: [..., I] -> [..., r]."""
    return F.linear(dropout(x) if dropout is not None else x, a.to(x.dtype))


def lora_up(z: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """s z B^T: [..., r] -> [..., O]."""
    return F.linear(z, b.to(z.dtype)) * scaling


def add_lora_up(y: torch.Tensor, z: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """y + s z B^T, with the scale folded into the add (one elementwise pass instead of two)."""
    return torch.add(y, F.linear(z, b.to(z.dtype)), alpha=scaling)


def factor_dtype(base_dtype: torch.dtype, autocast_adapter_dtype: bool) -> torch.dtype:
    """The adapter factors' dtype: float32 on a float16/bfloat16 base when autocasting (as PEFT's
    `autocast_adapter_dtype=True`: half-precision optimizer updates lose small steps), else the base's."""
    if autocast_adapter_dtype and base_dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return base_dtype


def lora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """The weight update s B A [O, I], computed in float32 or wider."""
    compute = torch.promote_types(a.dtype, torch.float32)
    return (b.to(compute) @ a.to(compute)) * scaling


def fold_delta(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """W + delta, added in delta's dtype (float32 or wider) and cast back to W's dtype."""
    return (weight.to(delta.dtype) + delta).to(weight.dtype)


def merged_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + s B A, accumulated in float32 (or wider) and cast back to W's dtype."""
    return fold_delta(weight, lora_delta(a, b, scaling))



# -- DoRA (weight-decomposed LoRA): y = m / ||W + s B A||_row * (x W^T + s z B^T) + b ------------

def dora_squared_norms(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """Row-wise ||W + s B A||^2 [O], float32 or wider, detached (the norm takes no gradient, as
    in PEFT and the paper).  On a row-parallel shard (W_i, A_i) this is a partial sum over TP."""
    with torch.no_grad():
        full = weight.to(torch.promote_types(weight.dtype, torch.float32)) + lora_delta(a, b, scaling)
        return full.square().sum(dim=1)


def dora_scale(magnitude: torch.Tensor, squared_norms: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """m / ||W + s B A||_row [O] in `dtype`; differentiable in m only."""
    return magnitude.to(dtype) / squared_norms.detach().sqrt().to(dtype)


def dora_merged_delta(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
                      magnitude: torch.Tensor, squared_norms: torch.Tensor) -> torch.Tensor:
    """W' - W for PEFT's merge W' = (m / ||W + s B A||) (W + s B A), float32 or wider."""
    delta = lora_delta(a, b, scaling)
    w = weight.to(delta.dtype)
    factor = magnitude.to(delta.dtype) / squared_norms.to(delta.dtype).sqrt()
    return factor.unsqueeze(1) * (w + delta) - w

