"""ShardSpec: the single source of truth for how a tensor is split over tensor-parallel ranks.

Plain data and pure slicing, no communication.  Adapter factors, Megatron parameters, EVA
statistics and checkpoint entries all declare their split with it, and the checkpoint index
records it: sharding is declared, never inferred from shapes (docs/design.md section 3).

`chunks` is Megatron's `partition_stride`: the split dimension is made of `chunks` equal logical
blocks, each split over the ranks on its own.  SwiGLU `linear_fc1` has chunks=2, so rank i holds
[gate_i; up_i] rather than a contiguous slice of [gate; up].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class ShardSpec:
    dim: int | None = None
    """Split dimension, or None for a tensor replicated on every TP rank."""
    chunks: int = 1
    """Logical blocks along `dim`, each split over the ranks separately (Megatron's partition_stride)."""

    def __post_init__(self) -> None:
        if self.chunks < 1:
            raise ValueError(f"ShardSpec.chunks must be >= 1, got {self.chunks}")
        if self.dim is None and self.chunks != 1:
            raise ValueError("ShardSpec.chunks applies only to a split tensor (dim is None)")

    @property
    def replicated(self) -> bool:
        return self.dim is None

    def local_shape(self, global_shape: Sequence[int], tp_size: int) -> tuple[int, ...]:
        shape = list(global_shape)
        if self.dim is not None:
            self._check_divisible(shape[self.dim], tp_size)
            shape[self.dim] //= tp_size
        return tuple(shape)

    def global_shape(self, local_shape: Sequence[int], tp_size: int) -> tuple[int, ...]:
        shape = list(local_shape)
        if self.dim is not None:
            shape[self.dim] *= tp_size
        return tuple(shape)

    def shard(self, full: torch.Tensor, rank: int, tp_size: int) -> torch.Tensor:
        """This rank's piece of `full` (a view where possible; callers clone if they keep it)."""
        if self.dim is None:
            return full
        self._check_divisible(full.shape[self.dim], tp_size)
        blocks = full.chunk(self.chunks, dim=self.dim)
        pieces = [block.chunk(tp_size, dim=self.dim)[rank] for block in blocks]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=self.dim)

    def unshard(self, shards: Sequence[torch.Tensor]) -> torch.Tensor:
        """Inverse of `shard` over all ranks' pieces, in rank order."""
        if self.dim is None:
            return shards[0]
        per_rank_blocks = [s.chunk(self.chunks, dim=self.dim) for s in shards]
        blocks = [torch.cat([blocks[c] for blocks in per_rank_blocks], dim=self.dim) for c in range(self.chunks)]
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=self.dim)

    def to_json(self) -> dict:
        return {"dim": self.dim, "chunks": self.chunks}

    @classmethod
    def from_json(cls, data: dict) -> "ShardSpec":
        unknown = set(data) - {"dim", "chunks"}
        if unknown:
            raise ValueError(f"ShardSpec: unknown fields {sorted(unknown)}")
        return cls(dim=data.get("dim"), chunks=int(data.get("chunks", 1)))

    def _check_divisible(self, size: int, tp_size: int) -> None:
        if size % (tp_size * self.chunks):
            raise ValueError(
                f"dimension {self.dim} of size {size} does not split into {self.chunks} block(s) "
                f"x {tp_size} tensor-parallel ranks"
            )


REPLICATED = ShardSpec()


@dataclass(frozen=True)
class ShardedTensor:
    """One rank's piece of a tensor, with how it was split and the full tensor's shape."""

    local: torch.Tensor
    spec: ShardSpec
    global_shape: tuple[int, ...]
