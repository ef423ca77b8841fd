"""The only module that calls torch.distributed collectives.

Three layers, as in Megatron's mappings: raw collectives (with a bypass for groups of one), then
autograd conjugate pairs that say exactly what moves in forward and in backward, then one-line
public wrappers.  Reading a layer's forward then tells you every byte it puts on the wire.

Every function takes its process group explicitly.  `group=None` means the whole world (as in
torch.distributed); `GROUP_OF_ONE` (ParallelGroups.single()) never communicates, and neither does
any group of size 1, so single-process code runs without an initialised default group.

Shape legend: S sequence, B batch, H hidden (any trailing dims), t = group size.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch.autograd import Function

from parallel_adapters.distributed.groups import GROUP_OF_ONE


def group_size(group: Any) -> int:
    if group is GROUP_OF_ONE:
        return 1
    if group is None:
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return dist.get_world_size(group)


def group_ranks(group: Any) -> tuple[int, ...]:
    """The global ranks of `group`, in group order (no communication): two group objects over the
    same ranks (Megatron's TP and expert-TP groups when the sizes match) can share one collective."""
    if group is GROUP_OF_ONE:
        return (group_rank(None),)
    if group is None:
        return tuple(range(group_size(None)))
    return tuple(dist.get_process_group_ranks(group))


def _device_for(group: Any) -> torch.device:
    """Where a small bookkeeping tensor must live for this group's backend (NCCL: the GPU)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def group_rank(group: Any) -> int:
    if group is GROUP_OF_ONE:
        return 0
    if group is None:
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return dist.get_rank(group)


# ----------------------------------------------------------------------------------------------
# Raw collectives
# ----------------------------------------------------------------------------------------------

def _all_reduce(x: torch.Tensor, group: Any, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, op=op, group=group)
    return x


def _all_gather_dim0(x: torch.Tensor, group: Any) -> torch.Tensor:
    """[S/t, ...] on each rank -> [S, ...] in rank order."""
    size = group_size(group)
    if size == 1:
        return x
    x = x.contiguous()
    out = torch.empty((x.shape[0] * size, *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x, group=group)
    return out


def _reduce_scatter_dim0(x: torch.Tensor, group: Any) -> torch.Tensor:
    """[S, ...] partial sums on each rank -> this rank's [S/t, ...] of the total."""
    size = group_size(group)
    if size == 1:
        return x
    if x.shape[0] % size:
        raise ValueError(f"reduce-scatter: leading dim {x.shape[0]} does not divide over {size} ranks")
    x = x.contiguous()
    out = torch.empty((x.shape[0] // size, *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.reduce_scatter_tensor(out, x, group=group)
    return out


def _all_gather_last_dim(x: torch.Tensor, group: Any) -> torch.Tensor:
    """[..., H/t] on each rank -> [..., H] in rank order."""
    size = group_size(group)
    if size == 1:
        return x
    stacked = _all_gather_dim0(x.movedim(-1, 0).contiguous(), group)  # [t*H/t, ...]
    pieces = stacked.chunk(size, dim=0)
    return torch.cat([p.movedim(0, -1) for p in pieces], dim=-1).contiguous()


def _split_last_dim(x: torch.Tensor, group: Any) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    return x.chunk(size, dim=-1)[group_rank(group)].contiguous()


# ----------------------------------------------------------------------------------------------
# Autograd conjugate pairs
# ----------------------------------------------------------------------------------------------

class _CopyToGroup(Function):
    """forward: identity; backward: all-reduce (sum)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone(), ctx.group), None


class _ReduceFromGroup(Function):
    """forward: all-reduce (sum); backward: identity."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherSequence(Function):
    """forward: all-gather along dim 0; backward: reduce-scatter along dim 0."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_dim0(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_dim0(grad, ctx.group), None


class _ReduceScatterSequence(Function):
    """forward: reduce-scatter along dim 0; backward: all-gather along dim 0."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_dim0(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_dim0(grad, ctx.group), None


class _GatherLastDim(Function):
    """forward: all-gather along the last dim; backward: keep this rank's slice (no communication)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_last_dim(grad, ctx.group), None


class _ScatterLastDim(Function):
    """forward: keep this rank's slice of the last dim; backward: all-gather along the last dim."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_last_dim(grad, ctx.group), None


# ----------------------------------------------------------------------------------------------
# Public wrappers: differentiable
# ----------------------------------------------------------------------------------------------

def copy_to_group(x: torch.Tensor, group: Any) -> torch.Tensor:
    """forward: identity; backward: all-reduce."""
    return x if group_size(group) == 1 else _CopyToGroup.apply(x, group)


def reduce_from_group(x: torch.Tensor, group: Any) -> torch.Tensor:
    """forward: all-reduce; backward: identity."""
    return x if group_size(group) == 1 else _ReduceFromGroup.apply(x, group)


def gather_sequence(x: torch.Tensor, group: Any) -> torch.Tensor:
    """forward: all-gather [S/t,...] -> [S,...]; backward: reduce-scatter."""
    return x if group_size(group) == 1 else _GatherSequence.apply(x, group)


def reduce_scatter_sequence(x: torch.Tensor, group: Any) -> torch.Tensor:
    """forward: reduce-scatter [S,...] -> [S/t,...]; backward: all-gather."""
    return x if group_size(group) == 1 else _ReduceScatterSequence.apply(x, group)


def gather_last_dim(x: torch.Tensor, group: Any) -> torch.Tensor:
    """forward: all-gather [...,H/t] -> [...,H]; backward: slice."""
    return x if group_size(group) == 1 else _GatherLastDim.apply(x, group)


def scatter_last_dim(x: torch.Tensor, group: Any) -> torch.Tensor:
    """forward: slice [...,H] -> [...,H/t]; backward: all-gather."""
    return x if group_size(group) == 1 else _ScatterLastDim.apply(x, group)


# ----------------------------------------------------------------------------------------------
# Public wrappers: not differentiable (gradient reduction, agreement, bookkeeping)
# ----------------------------------------------------------------------------------------------

def all_reduce_coalesced_(tensors: Sequence[torch.Tensor], group: Any, op=dist.ReduceOp.SUM) -> None:
    """In place: reduce all `tensors` over `group` with ONE collective (flatten, reduce, copy back)."""
    tensors = list(tensors)
    if not tensors or group_size(group) == 1:
        return
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1:
        raise ValueError(f"all_reduce_coalesced_: tensors must share one dtype, got {sorted(map(str, dtypes))}")
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=op, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def all_reduce_(x: torch.Tensor, group: Any, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In place all-reduce of a contiguous tensor; returns it."""
    if group_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


def all_gather_tensor(x: torch.Tensor, group: Any) -> list[torch.Tensor]:
    """Every rank's copy of a same-shaped tensor, in group-rank order."""
    size = group_size(group)
    if size == 1:
        return [x]
    return list(_all_gather_dim0(x.unsqueeze(0), group).unbind(0))


def all_gather_objects(obj: Any, group: Any) -> list[Any]:
    """Every rank's picklable `obj` (small metadata only), in group-rank order."""
    size = group_size(group)
    if size == 1:
        return [obj]
    out: list[Any] = [None] * size
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_(x: torch.Tensor, src_group_rank: int, group: Any) -> torch.Tensor:
    """In place broadcast from the rank with index `src_group_rank` inside `group`."""
    if group_size(group) > 1:
        src = dist.get_global_rank(group, src_group_rank) if group is not None else src_group_rank
        dist.broadcast(x, src=src, group=group)
    return x


def all_ranks_agree(flag: bool, group: Any) -> bool:
    """True only if `flag` is True on every rank of `group` (a collective decision)."""
    if group_size(group) == 1:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=_device_for(group))
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return bool(t.item())


def barrier(group: Any = None) -> None:
    if dist.is_available() and dist.is_initialized() and group_size(group) > 1:
        dist.barrier(group=group)


# -- EVA --

def all_reduce_max_(x: torch.Tensor, group: Any) -> torch.Tensor:
    """In place element-wise MAX over `group`; returns it.

    EVA encodes its per-step decisions (explained-variance ratios, convergence flags as -flag)
    in one vector and MAX-reduces it, so every rank derives its choices from bit-identical inputs.
    """
    if group_size(group) > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    return x
