"""LoHa's and LoKr's `rank_dropout` and `module_dropout` at world size 1 (plain nn.Linear) against
Hugging Face PEFT's own layers in training, float64 (PEFT's LoKr scales its mask in float32).  The masks are fixed by feeding PEFT our draws:
each of our layers' draws is recorded (`WeightDropout.source.uniform`), and PEFT's forward runs
with `torch.rand` replaced by a function that hands back, in call order, u[:1] for its module
coin (`torch.rand(1)`) and u[1:] for its row mask (`torch.rand(O)`).  PEFT's own code then decides
the skip (u > module_dropout), the rows and their scaling (LoHa: divided by the mask's mean;
LoKr: only with rank_dropout_scale).  Over six forwards (some skipping an adapter): outputs and
gradients (input and every adapter tensor; none where an adapter sat out) within 1e-6 of the
largest entry; eval applies no dropout; the exported config carries the fields.  The same on
nn.Conv2d modules (a 3x3 and a 1x1 conv; LoKr in the Tucker form), where PEFT drops dW's output
channels.
"""
import copy

import pytest
import torch
from torch import nn

from parallel_adapters import LoHaConfig, LoKrConfig, ParallelGroups, get_adapter_model
from tests.helpers.peft_oracle import Two

peft = pytest.importorskip("peft")

IN_F, OUT_F = 16, 12
NAMES = ("q_proj", "v_proj")
FORWARDS = 6
DROP = dict(rank_dropout=0.4, module_dropout=0.4)
KINDS = {
    "loha": (LoHaConfig, "LoHaConfig", dict(r=4, alpha=6)),
    "lokr": (LoKrConfig, "LoKrConfig", dict(r=1, alpha=3, decompose_both=True, rank_dropout_scale=True)),
    "lokr-unscaled": (LoKrConfig, "LoKrConfig", dict(r=8, alpha=6)),
    "loha-conv": (LoHaConfig, "LoHaConfig", dict(r=2, alpha=3)),
    "lokr-conv": (LoKrConfig, "LoKrConfig", dict(r=1, alpha=2, use_effective_conv2d=True, decompose_both=True,
                                                 rank_dropout_scale=True)),
}


class TwoConvs(Two):
    def __init__(self):
        nn.Module.__init__(self)
        self.q_proj = nn.Conv2d(4, 8, kernel_size=3, padding=1)  # W [8, 4, 3, 3]: 8 rows to drop
        self.v_proj = nn.Conv2d(8, 8, kernel_size=1)             # W [8, 8, 1, 1]


def _input(kind, *batch):
    return torch.randn(*batch[:1], 4, 5, 5, dtype=torch.float64) if kind.endswith("conv") else \
        torch.randn(*batch, IN_F, dtype=torch.float64)


def _pair(kind):
    ours_cls, peft_name, kw = KINDS[kind]
    torch.manual_seed(0)
    base = (TwoConvs if kind.endswith("conv") else Two)().double()
    kw = dict(target_modules=list(NAMES), **DROP, **kw)
    ours = get_adapter_model(copy.deepcopy(base), ours_cls(seed=2, **kw), groups=ParallelGroups.single())
    theirs = peft.get_peft_model(copy.deepcopy(base), getattr(peft, peft_name)(**kw))
    for name in NAMES:
        o, p = getattr(ours.model, name), getattr(theirs.base_model.model, name)
        for tensor_name, param in o.adapter_tensors("default").items():
            with torch.no_grad():
                param.copy_(0.5 * torch.randn(param.shape, dtype=torch.float64))
                getattr(p, tensor_name)["default"].copy_(param)
    return ours, theirs


def _record(ours) -> list[torch.Tensor]:
    """Every draw of our layers' weight dropouts, in call order."""
    drawn = []
    for name in NAMES:
        source = getattr(ours.model, name)._weight_dropout["default"].source
        uniform = source.uniform
        source.uniform = lambda n, device, uniform=uniform: drawn.append(uniform(n, device)) or drawn[-1]
    return drawn


class _Replay:
    """torch.rand for PEFT's forward: u[:1] for a module coin, then u[1:] for that layer's rows."""

    def __init__(self, drawn):
        self.drawn, self.rows = iter(drawn), None

    def __call__(self, *size, **kwargs):
        if tuple(size) in ((1,), ((1,),)):
            u = next(self.drawn)
            self.rows = u[1:]
            return u[:1].clone()
        assert self.rows is not None and tuple(size) == (self.rows.numel(),), size
        rows, self.rows = self.rows, None
        return rows.clone()


def _run(model, x, names):
    params = dict(model.named_parameters())
    x = x.clone().requires_grad_()
    y = model(x)
    y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
    grads = [x.grad] + [params[n].grad for n in names]
    for p in params.values():
        p.grad = None
    return y.detach(), [torch.zeros(1) if g is None else g for g in grads]


def _close(a, b, name):
    error, scale = (a - b).abs().max().item(), max(1.0, b.abs().max().item())
    assert a.shape == b.shape and error <= 1e-6 * scale, f"{name}: {error} (largest entry {scale})"


@pytest.mark.parametrize("kind", KINDS)
def test_training_forwards_match_peft_with_the_same_draws(kind, monkeypatch):
    ours, theirs = _pair(kind)
    drawn = _record(ours)
    ours_names = sorted(n for n, p in ours.named_parameters() if p.requires_grad)
    theirs_names = [("base_model." + n).replace(".default.weight", ".default") for n in ours_names]
    ours.train()
    theirs.train()
    skipped = 0
    for step in range(FORWARDS):
        x = _input(kind, 3, 5)
        start = len(drawn)
        y_ours, g_ours = _run(ours, x, ours_names)
        assert len(drawn) == start + len(NAMES)
        skipped += sum(not u[0] > DROP["module_dropout"] for u in drawn[start:])
        with monkeypatch.context() as m:
            m.setattr(torch, "rand", _Replay(drawn[start:]))
            y_theirs, g_theirs = _run(theirs, x, theirs_names)
        _close(y_ours, y_theirs, f"forward {step}: y")
        for name, a, b in zip(["x", *ours_names], g_ours, g_theirs):
            _close(a, b, f"forward {step}: d{name}")
    assert 0 < skipped < FORWARDS * len(NAMES), skipped  # both paths taken
    ours.eval()
    theirs.eval()
    x = _input(kind, 4)
    _close(ours(x), theirs(x), "eval")
    assert len(drawn) == FORWARDS * len(NAMES)  # eval draws nothing


@pytest.mark.parametrize("kind", KINDS)
def test_exported_config_carries_the_dropouts(kind):
    from parallel_adapters.adapters.kinds import get_kind

    ours_cls, _, kw = KINDS[kind]
    config = ours_cls(target_modules=list(NAMES), **DROP, **kw).to_dict()
    peft_config = get_kind(kind.split("-")[0]).peft_config(config, {n: {"r": kw["r"], "alpha": kw["alpha"]}
                                                                    for n in NAMES}, list(NAMES), None)
    assert {k: peft_config[k] for k in DROP} == DROP
    if kind.startswith("lokr"):
        assert peft_config["rank_dropout_scale"] == kw.get("rank_dropout_scale", False)


def test_plain_layer_draw_counts_resume_the_masks():
    """On plain layers the draws come from (seed, call count): the counts saved with a checkpoint
    (`adapter_dropout_calls`) make a new model continue with the very next masks."""
    from parallel_adapters.train.loop import dropout_counters, restore_dropout_counters

    models = [_pair("loha")[0] for _ in range(2)]
    draws = [_record(m) for m in models]
    x = torch.randn(3, IN_F, dtype=torch.float64)
    models[0].train()
    models[1].train()
    for _ in range(3):
        models[0](x)
    saved = dropout_counters(models[0])
    assert saved == {n: {"default/weight-dropout": 3} for n in NAMES}, saved
    restore_dropout_counters(models[1], saved)
    outputs = [m(x) for m in models]
    assert torch.equal(outputs[0], outputs[1])
    assert all(torch.equal(a, b) for a, b in zip(draws[0][-2:], draws[1]))
    assert not torch.equal(draws[0][0], draws[0][-2])
