"""EVA rank allocation vs PEFT 0.21.2's `_get_rank_distribution` (extracted from its closure)."""
from __future__ import annotations

import random
import types
from types import SimpleNamespace

import pytest
import torch

from parallel_adapters.eva.allocation import (
    adjusted_alpha,
    allocate_ranks,
    effective_rho,
    group_max_ranks,
    max_rank,
    rank_budget,
    shared_input_map,
)


def peft_rank_distribution():
    """PEFT defines `_get_rank_distribution` inside `_get_eva_state_dict`; rebuild it from its code."""
    import peft.tuners.lora.eva as eva

    code = next(
        c for c in eva._get_eva_state_dict.__code__.co_consts
        if isinstance(c, types.CodeType) and c.co_name == "_get_rank_distribution"
    )
    assert code.co_freevars == ()
    return types.FunctionType(code, vars(eva))


def run_peft(ratios, max_components, budget, shared):
    hooks = {k: (SimpleNamespace(svd=SimpleNamespace(explained_variance_ratio_=v)), None)
             for k, v in ratios.items()}
    layer_hook_map = {**{k: k for k in hooks}, **shared}
    return peft_rank_distribution()(hooks, layer_hook_map, shared, budget, max_components)


def random_case(rng: random.Random, ties: bool):
    """Layers with descending ratios; `ties` draws from a tiny value set so many entries are equal."""
    n_layers = rng.randint(2, 6)
    names = [f"layers.{i}.proj" for i in range(n_layers)]
    r = {n: rng.choice([2, 4, 8]) for n in names}
    rho = rng.choice([1.0, 1.5, 2.0, 3.0, 2.5])
    shared = shared_input_map({n: rng.randint(0, n_layers - 2) for n in names}) if rng.random() < 0.5 else {}
    caps = group_max_ranks({n: max_rank(r[n], rho) for n in names}, shared)
    ratios = {}
    for n in names:
        if n in shared:
            continue
        if ties:
            v = torch.tensor([rng.choice([0.05, 0.1, 0.2]) for _ in range(caps[n])], dtype=torch.float64)
        else:
            gen = torch.Generator().manual_seed(rng.randint(0, 99))
            v = torch.rand(caps[n], dtype=torch.float64, generator=gen)
            v = v * rng.choice([1.0, 1e-3])  # some layers get (nearly) nothing
        ratios[n] = v.sort(descending=True).values
    return ratios, caps, rank_budget(r), shared


@pytest.mark.parametrize("ties", [False, True])
def test_allocate_ranks_matches_peft_on_random_inputs(ties: bool):
    rng = random.Random(1234 + ties)
    saw_zero = saw_cap = False
    for _ in range(200):
        ratios, caps, budget, shared = random_case(rng, ties)
        ours = allocate_ranks(ratios, caps, budget, shared)
        theirs = run_peft(ratios, caps, budget, shared)
        assert ours == theirs and list(ours) == list(theirs)
        assert sum(ours.values()) == min(budget, sum(len(ratios[shared.get(k, k)]) for k in ours))
        saw_zero |= 0 in ours.values()
        saw_cap |= any(ours[k] == caps[k] > budget / len(ours) for k in ours)
    assert saw_zero and saw_cap


def test_allocate_ranks_many_exact_ties_matches_peft_argsort():
    """A pool large enough that torch's unstable CPU sort does not keep input order on ties."""
    ratios = {f"l{i}": torch.full((40,), 0.01, dtype=torch.float64) for i in range(10)}
    caps = {k: 40 for k in ratios}
    ours = allocate_ranks(ratios, caps, 150)
    assert ours == run_peft(ratios, caps, 150, {})
    stable = allocate_ranks(ratios, caps, 150, stable=True)
    assert stable == {**{f"l{i}": 40 for i in range(3)}, "l3": 30, **{f"l{i}": 0 for i in range(4, 10)}}


def test_allocate_ranks_handmade_cap_zero_and_budget():
    ratios = {
        "a": torch.tensor([0.5, 0.3, 0.1, 0.05], dtype=torch.float64),
        "b": torch.tensor([0.2, 0.15, 0.12, 0.01], dtype=torch.float64),
        "c": torch.tensor([0.001, 0.0005, 0.0001, 0.0], dtype=torch.float64),
    }
    caps = {"a": 3, "b": 4, "c": 4}  # "a" is capped at 3, so its 0.05 is never pooled
    got = allocate_ranks(ratios, caps, budget=6)
    assert got == {"a": 3, "b": 3, "c": 0}
    assert got == run_peft(ratios, caps, 6, {})


def test_shared_inputs_owner_takes_largest_count():
    f64 = torch.float64
    ratios = {"q": torch.tensor([0.4, 0.1], dtype=f64), "o": torch.tensor([0.3, 0.2], dtype=f64)}
    shared = shared_input_map({"q": "h1", "o": "h2", "k": "h1", "v": "h1"})
    assert shared == {"k": "q", "v": "q"}
    caps = group_max_ranks({"q": 1, "k": 2, "v": 2, "o": 2}, shared)
    assert caps == {"q": 2, "k": 2, "v": 2, "o": 2}
    got = allocate_ranks(ratios, caps, budget=4, shared_inputs=shared)
    assert got == run_peft(ratios, caps, 4, shared)
    assert got["q"] >= max(got["k"], got["v"])
    assert got == {"q": 1, "o": 1, "k": 1, "v": 1}


def test_shared_inputs_swap_matches_peft_when_ties_favour_a_member():
    """Owner and members pool identical values, so only the swap guarantees the owner the most."""
    ratios = {"q": torch.full((8,), 0.01, dtype=torch.float64)}
    shared = {"k": "q", "v": "q"}
    order = torch.argsort(torch.full((24,), 0.01, dtype=torch.float64), descending=True)
    member_led = False
    for budget in range(1, 25):
        top = order[:budget]
        owner_n, k_n = int((top < 8).sum()), int(((top >= 8) & (top < 16)).sum())
        member_led |= owner_n < k_n
        got = allocate_ranks(ratios, {"q": 8}, budget, shared)
        assert got == run_peft(ratios, {"q": 8}, budget, shared)
        assert got["q"] >= max(got["k"], got["v"]) and sum(got.values()) == budget
    assert member_led  # the unstable sort really did put a member first for some budget


def test_max_rank_uses_python_round_and_rho_ceiling():
    assert max_rank(8, 2.0) == 16
    assert max_rank(3, 1.5) == 4  # 4.5 -> 4 (round half to even), not int() -> 4 or ceil -> 5
    assert max_rank(5, 1.5) == 8  # 7.5 -> 8
    assert max_rank(3, 1.3) == 4  # 3.9 -> 4 (int() would give 3)
    assert effective_rho(2.0, 8, 4096) == 2.0
    assert effective_rho(1e6, 8, 4096) == 512
    assert rank_budget({"a": 8, "b": 4}) == 12


def test_adjusted_alpha_keeps_alpha_over_r():
    assert adjusted_alpha(16, 8, 8) == 16 and isinstance(adjusted_alpha(16, 8, 8), int)
    assert adjusted_alpha(16, 8, 12) == 24.0
    assert adjusted_alpha(16, 8, 4) / 4 == 16 / 8
    assert adjusted_alpha(16, 8, 4, adjust=False) == 16
