"""`add_weighted_adapter` at world size 1 on plain nn.Linear layers against Hugging Face PEFT's own
`LoraModel.add_weighted_adapter` (the oracle), float32, both models holding identical source factors.

Checked per combination_type: linear, cat, ties, magnitude_prune give PEFT's factors within 1e-5;
svd gives PEFT's update B A (and its factors up to the sign of each singular pair: PEFT keeps
LAPACK's signs, ours makes the largest entry of each row of A positive); svd_clamp equals PEFT's
quantile clamp applied to our signed factors; dare_* with density 1 equal PEFT's (the deterministic
part: PEFT draws its masks from torch's global RNG), and with density 0.5 every combined entry is
one of the 2^n sums a mask could give, with about half of each source kept.  Also the refusals.
"""
import copy
import itertools

import pytest
import torch
from torch import nn

from parallel_adapters import LoraConfig, ParallelGroups, get_adapter_model

peft = pytest.importorskip("peft")

TOL = 1e-5
WEIGHTS = [0.7, -1.3]


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(24, 40)
        self.down = nn.Linear(40, 32, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _pair(r2=4, alpha2=16):
    torch.manual_seed(0)
    base = Stack()
    first = dict(r=4, lora_alpha=8, target_modules=["up", "down"], init_lora_weights=False)
    second = dict(first, r=r2, lora_alpha=alpha2)
    ours = get_adapter_model(copy.deepcopy(base), LoraConfig(**first, seed=1), "one", groups=ParallelGroups.single())
    ours.add_adapter("two", LoraConfig(**second, seed=2))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**first), adapter_name="one")
    theirs.add_adapter("two", peft.LoraConfig(**second))
    for name in ("up", "down"):
        mine, peft_layer = getattr(ours.model, name), getattr(theirs.base_model.model, name)
        for adapter in ("one", "two"):
            for t in ("lora_A", "lora_B"):
                getattr(peft_layer, t)[adapter].weight.data.copy_(getattr(mine, t)[adapter].weight.detach())
    return ours, theirs


def _factors(ours, theirs, name, adapter="mix"):
    mine, peft_layer = getattr(ours.model, name), getattr(theirs.base_model.model, name)
    return ((mine.lora_A[adapter].weight.detach(), mine.lora_B[adapter].weight.detach()),
            (peft_layer.lora_A[adapter].weight.detach(), peft_layer.lora_B[adapter].weight.detach()),
            (mine.scaling[adapter], peft_layer.scaling[adapter]))


def _both(ours, theirs, **kw):
    ours.add_weighted_adapter(["one", "two"], WEIGHTS, "mix", **kw)
    theirs.add_weighted_adapter(["one", "two"], WEIGHTS, "mix", **kw)


@pytest.mark.parametrize("combination_type,kw", [
    ("linear", {}), ("ties", {"density": 0.4}), ("ties", {"density": 0.6, "majority_sign_method": "frequency"}),
    ("magnitude_prune", {"density": 0.3}), ("dare_linear", {"density": 1.0}), ("dare_ties", {"density": 1.0}),
])
def test_factor_wise_types_give_peft_factors(combination_type, kw):
    ours, theirs = _pair()
    _both(ours, theirs, combination_type=combination_type, **kw)
    for name in ("up", "down"):
        (a, b), (pa, pb), (s, ps) = _factors(ours, theirs, name)
        assert s == ps
        assert (a - pa).abs().max() < TOL and (b - pb).abs().max() < TOL, (name, combination_type)
        assert b.abs().max() > 0.01  # not a vacuous comparison of zeros


def test_cat_gives_peft_factors():
    ours, theirs = _pair(r2=2, alpha2=6)
    _both(ours, theirs, combination_type="cat")
    for name in ("up", "down"):
        (a, b), (pa, pb), (s, ps) = _factors(ours, theirs, name)
        assert a.shape == (6, a.shape[1]) and s == ps
        assert (a - pa).abs().max() < TOL and (b - pb).abs().max() < TOL


@pytest.mark.parametrize("svd_rank", [None, 2, 6])
def test_svd_gives_peft_update(svd_rank):
    ours, theirs = _pair(r2=3, alpha2=6)
    _both(ours, theirs, combination_type="svd", svd_rank=svd_rank)
    for name in ("up", "down"):
        (a, b), (pa, pb), (s, ps) = _factors(ours, theirs, name)
        assert s == ps and a.shape == pa.shape
        assert (s * b @ a - ps * pb @ pa).abs().max() < TOL
        k = min(svd_rank or 4, 7)  # the product has rank 4 + 3
        signs = torch.sign((a[:k] * pa[:k]).sum(dim=1))
        assert (a[:k] * signs[:, None] - pa[:k]).abs().max() < TOL
        assert (b[:, :k] * signs - pb[:, :k]).abs().max() < TOL
        top = a[:k].gather(1, a[:k].abs().argmax(dim=1, keepdim=True))
        assert (top > 0).all()  # our sign convention


def test_svd_clamp_is_peft_quantile_clamp_on_our_factors():
    ours, _ = _pair(r2=3, alpha2=6)
    ours.add_weighted_adapter(["one", "two"], WEIGHTS, "plain", combination_type="svd")
    ours.add_weighted_adapter(["one", "two"], WEIGHTS, "clamped", combination_type="svd", svd_clamp=0.8)
    for name in ("up", "down"):
        layer = getattr(ours.model, name)
        a, b = layer.lora_A["plain"].weight.detach(), layer.lora_B["plain"].weight.detach()
        high = torch.quantile(torch.cat([b.flatten(), a.flatten()]), 0.8)
        assert (layer.lora_A["clamped"].weight.detach() - a.clamp(-high, high)).abs().max() < TOL
        assert (layer.lora_B["clamped"].weight.detach() - b.clamp(-high, high)).abs().max() < TOL
        assert (b.abs() > high).any()  # the clamp did something


@pytest.mark.parametrize("combination_type,density", [
    ("magnitude_prune_svd", 0.5), ("ties_svd", 0.4), ("dare_linear_svd", 1.0), ("dare_ties_svd", 1.0),
])
def test_pruned_svd_types_give_peft_update(combination_type, density):
    ours, theirs = _pair(r2=3, alpha2=6)
    _both(ours, theirs, combination_type=combination_type, density=density, svd_rank=3)
    for name in ("up", "down"):
        (a, b), (pa, pb), (s, ps) = _factors(ours, theirs, name)
        assert s == ps and a.shape == pa.shape
        assert (s * b @ a - ps * pb @ pa).abs().max() < TOL, (name, combination_type)


@pytest.mark.parametrize("combination_type", ["dare_linear", "dare_ties"])
def test_dare_masks(combination_type):
    ours, theirs = _pair()
    ours.add_weighted_adapter(["one", "two"], WEIGHTS, "mix", combination_type=combination_type, density=0.5)
    layer = ours.model.up
    from parallel_adapters.adapters.weighted_math import factor_weights
    w_a, _ = factor_weights(WEIGHTS, [layer.scaling["one"], layer.scaling["two"]])
    a = layer.lora_A["mix"].weight.detach()
    sources = [layer.lora_A[n].weight.detach() / 0.5 * w for n, w in zip(("one", "two"), w_a)]
    if combination_type == "dare_linear":  # each entry: one of the 4 masked sums
        options = torch.stack([m0 * sources[0] + m1 * sources[1] for m0, m1 in itertools.product([0, 1], repeat=2)])
        assert ((options - a).abs().min(dim=0).values < TOL).all()
    kept = (a != 0).double().mean().item()
    assert 0.6 < kept < 0.9  # 1 - 0.5^2 = 0.75 of the entries keep at least one source


def test_refusals():
    ours, _ = _pair(r2=2, alpha2=6)
    with pytest.raises(ValueError, match="one rank"):
        ours.add_weighted_adapter(["one", "two"], WEIGHTS, "x", combination_type="linear")
    with pytest.raises(ValueError, match="combination_type must be one of"):
        ours.add_weighted_adapter(["one", "two"], WEIGHTS, "x", combination_type="sum")
    with pytest.raises(ValueError, match="density"):
        ours.add_weighted_adapter(["one", "one"], WEIGHTS, "x", combination_type="ties")
    with pytest.raises(ValueError, match="unknown adapter"):
        ours.add_weighted_adapter(["one", "nope"], WEIGHTS, "x", combination_type="cat")
    assert "x" not in ours.peft_config
