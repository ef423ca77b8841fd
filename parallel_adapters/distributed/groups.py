"""ParallelGroups: the process groups and coordinates of one rank, passed explicitly everywhere.

Plain data: `mcore.compat.megatron_parallel_groups()` builds one from Megatron's parallel state
(the only place that reads those globals); offline tools and tests use `ParallelGroups.single()`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class _GroupOfOne:
    """This rank alone.  Distinct from None, which torch.distributed (and collectives.py) read as
    the whole world: ParallelGroups.single() inside a multi-rank job must not talk to anyone."""

    def __repr__(self) -> str:
        return "GROUP_OF_ONE"


GROUP_OF_ONE = _GroupOfOne()


@dataclass(frozen=True)
class ParallelGroups:
    """Tensor-, pipeline- and data-parallel groups of this rank (GROUP_OF_ONE: no parallelism)."""

    tp_group: Any = GROUP_OF_ONE
    pp_group: Any = GROUP_OF_ONE
    dp_group: Any = GROUP_OF_ONE
    tp_size: int = 1
    tp_rank: int = 0
    pp_size: int = 1
    pp_rank: int = 0
    dp_size: int = 1
    dp_rank: int = 0
    ep_group: Any = GROUP_OF_ONE
    """Expert-parallel group: the ranks that hold different experts of one MoE layer."""
    etp_group: Any = GROUP_OF_ONE
    """Expert-tensor-parallel group: the ranks that split one expert's weights."""
    expert_dp_group: Any = GROUP_OF_ONE
    """Expert-data-parallel group: the ranks that hold the same expert shard (its gradients
    reduce over this group, not over dp_group)."""
    ep_size: int = 1
    ep_rank: int = 0
    etp_size: int = 1
    etp_rank: int = 0
    expert_dp_size: int = 1
    expert_dp_rank: int = 0

    @classmethod
    def single(cls) -> "ParallelGroups":
        """One process, no parallelism (offline tools, unit tests)."""
        return cls()

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1
