"""EVA's per-step machinery in one process (eva/distributed.py): the step queue decomposes queued
layers together, and batching or flushing early must not change a layer's state (reference: the
same updates one layer at a time, float64); the TP owner assignment is balanced and deterministic."""
from __future__ import annotations

import torch

from parallel_adapters import ParallelGroups
from parallel_adapters.eva import distributed as D
from parallel_adapters.eva.tp_svd import Gaussians

F64 = torch.float64


def layer(name: str, width: int, cap: int = 4) -> D.LayerStats:
    s = D.LayerStats(name, False, False, width, width, ParallelGroups.single(), Gaussians(0))
    s.configure(cap, 2 * cap)
    return s


def rows(n: int, width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(6, width, generator=g, dtype=F64)
    return torch.randn(n, 6, generator=g, dtype=F64) * torch.tensor([8, 4, 2, 1, 0.5, 0.25], dtype=F64) @ basis


def run(budget: int, calls: list[tuple[str, int]], widths: dict[str, int], flush_every_call: bool = False):
    stats = {n: layer(n, w) for n, w in widths.items()}
    queue = D.StepQueue(ParallelGroups.single(), budget=budget)
    for name, seed in calls:
        queue.add(stats[name], rows(40, widths[name], seed))
        if flush_every_call:
            queue.flush()
    queue.flush()
    return stats


WIDTHS = {"a": 24, "b": 24, "c": 36}
CALLS = [("a", 1), ("b", 2), ("c", 3), ("a", 4), ("b", 5), ("c", 6)]  # "a" again: flushes first


def test_queue_batching_and_budget_flushes_do_not_change_the_state():
    one_by_one = run(1 << 30, CALLS, WIDTHS, flush_every_call=True)
    for budget in (1 << 30, 0, 40 * 24 * 8 + 1):
        batched = run(budget, CALLS, WIDTHS)
        for name, s in batched.items():
            ref = one_by_one[name].state
            assert s.state.n_samples == ref.n_samples == 80
            torch.testing.assert_close(s.state.singular_values, ref.singular_values, atol=1e-9, rtol=0)
            torch.testing.assert_close(s.state.components, ref.components, atol=1e-9, rtol=0)
            torch.testing.assert_close(s.state.mean, ref.mean, atol=1e-12, rtol=0)


def test_second_call_of_a_layer_in_one_step_sees_the_first():
    stats = run(1 << 30, [("a", 1), ("a", 2)], {"a": 24})
    assert stats["a"].state.n_samples == 80


def test_calls_with_fewer_rows_than_the_cap_are_skipped_as_in_peft():
    s = layer("a", 24, cap=8)
    queue = D.StepQueue(ParallelGroups.single())
    queue.add(s, rows(40, 24, 1)[:7])
    queue.flush()
    assert s.state is None
    queue.add(s, rows(40, 24, 1)[:8])
    queue.flush()
    assert s.state.n_samples == 8


def test_float32_rows_are_decomposed_in_float32_into_a_float64_state():
    s = layer("a", 24)
    queue = D.StepQueue(ParallelGroups.single())
    queue.add(s, rows(40, 24, 1).float())
    queue.flush()
    assert s.dtype == torch.float32 and s.state.components.dtype == F64


def test_assign_tp_owners_balances_the_cost_deterministically():
    costs = [576, 576, 576, 576, 1536, 1536]
    owners = D.assign_tp_owners(costs, 3)
    assert owners == D.assign_tp_owners(list(costs), 3)
    load = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(3)]
    assert max(load) == 1536 + 576  # the best split of these six (largest first, to the least loaded rank)
    assert D.assign_tp_owners([5, 5, 5, 5], 2) == [0, 1, 0, 1]  # ties go to the lowest rank
    assert D.assign_tp_owners([], 4) == []
