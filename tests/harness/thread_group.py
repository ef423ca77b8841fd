"""Emulated process groups for the pure collective functions (decompose/, weighted_math): one
process runs t "ranks" as t threads that meet in every collective, so TP sizes beyond the real
worker pool (up to 8) cost no processes.

`ThreadGroup(t).run(fn)` calls fn(rank) in t threads and returns their results in rank order.
Inside `emulated_collectives()`, `distributed.collectives`' group_size / group_rank /
all_gather_tensor / all_reduce_ / all_reduce_max_ / all_ranks_agree treat a ThreadGroup as a group
of t ranks (any other group goes to the real functions).  A reduction sums the t tensors in rank
order, so every rank gets bit-identical results, as a real all-reduce's.  Each rank's received
elements per collective are recorded as the recording tests count them (all-reduce: the tensor;
all-gather: the output).
"""
from __future__ import annotations

import contextlib
import threading

import torch
import torch.distributed as dist

from parallel_adapters.distributed import collectives


class ThreadGroup:
    def __init__(self, size: int):
        self.size = size
        self._barrier = threading.Barrier(size, timeout=120)
        self._slots: list = [None] * size
        self._local = threading.local()
        self.received: list[list[int]] = [[] for _ in range(size)]

    @property
    def rank(self) -> int:
        return self._local.rank

    def exchange(self, x: torch.Tensor, counted: int) -> list[torch.Tensor]:
        """Every rank's `x`, in rank order (a collective over the threads; none for one rank, as
        the real functions bypass a group of one)."""
        if self.size == 1:
            return [x]
        self._slots[self.rank] = x.detach().clone()
        self._barrier.wait()
        out = [s.clone() for s in self._slots]
        self._barrier.wait()  # nobody overwrites a slot before every rank has read them all
        self.received[self.rank].append(counted)
        return out

    def run(self, fn) -> list:
        results, errors = [None] * self.size, []

        def target(rank):
            self._local.rank = rank
            try:
                results[rank] = fn(rank)
            except BaseException as error:  # noqa: BLE001 - re-raised below; free the others first
                errors.append(error)
                self._barrier.abort()

        threads = [threading.Thread(target=target, args=(i,)) for i in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


@contextlib.contextmanager
def emulated_collectives():
    real = {n: getattr(collectives, n) for n in ("group_size", "group_rank", "all_gather_tensor", "all_reduce_",
                                                 "all_reduce_max_", "all_ranks_agree")}

    def reduce(x, group, op):
        parts = group.exchange(x, x.numel())
        if op == dist.ReduceOp.SUM:
            total = parts[0]
            for p in parts[1:]:
                total = total + p
        else:
            stacked = torch.stack(parts)
            total = stacked.max(0).values if op == dist.ReduceOp.MAX else stacked.min(0).values
        return x.copy_(total)

    def dispatch(name, emulated):
        def fn(*args, **kwargs):
            group = args[1] if len(args) > 1 else kwargs.get("group", args[0] if name in ("group_size", "group_rank")
                                                             else None)
            if isinstance(group, ThreadGroup):
                return emulated(*args, **kwargs)
            return real[name](*args, **kwargs)
        return fn

    emulations = {
        "group_size": lambda group: group.size,
        "group_rank": lambda group: group.rank,
        "all_gather_tensor": lambda x, group: group.exchange(x, x.numel() * group.size),
        "all_reduce_": lambda x, group, op=dist.ReduceOp.SUM: reduce(x, group, op),
        "all_reduce_max_": lambda x, group: reduce(x, group, dist.ReduceOp.MAX),
        "all_ranks_agree": lambda flag, group: bool(reduce(torch.tensor([int(bool(flag))]), group,
                                                           dist.ReduceOp.MIN).item()),
    }
    try:
        for name, emulated in emulations.items():
            setattr(collectives, name, dispatch(name, emulated))
        yield
    finally:
        for name, fn in real.items():
            setattr(collectives, name, fn)
