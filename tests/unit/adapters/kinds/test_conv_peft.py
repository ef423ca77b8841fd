"""IA3, LoHa and LoKr on plain nn.Conv2d modules (a 3x3 strided grouped conv and a 1x1 conv) at world size
1 against Hugging Face PEFT's own Conv2d layers (the oracle): the same base and adapter tensor
values (random: IA3's scales are not 1, no zero factor), fp32.  Both use_effective_conv2d values
(PEFT's Tucker tensors hada_t1/hada_t2, lokr_t2 on the 3x3 conv; PEFT turns it off for 1x1), and
LoKr with w2 whole (a 4-D kernel) as well as a product.  Outputs and gradients (input and every
adapter tensor) within 1e-6 of each tensor's largest entry (tests/helpers/peft_oracle.py; PEFT's
LoHa Tucker backward is replaced by autograd of its forward, see below); merged
weights and biases equal PEFT's merge_and_unload; unmerge restores the base exactly; the default
init is a no-op; save_pretrained loads in PEFT and in our from_pretrained, and PEFT's in ours.
"""
import copy

import pytest
import torch
from torch import nn

from tests.helpers.peft_oracle import (
    check_merge_and_unmerge, check_outputs_and_gradients, close, copy_into_peft,
)
from parallel_adapters import IA3Config, LoHaConfig, LoKrConfig, ParallelGroups, get_adapter_model
from parallel_adapters.adapters.hosts.embedding import Conv2dHost

SINGLE = ParallelGroups.single()

peft = pytest.importorskip("peft")

NAMES = ("conv", "pw")
CASES = {  # name: (our config class, PEFT's, fields both take, the 3x3 conv's tensors)
    "ia3-out-in": (IA3Config, peft.IA3Config, dict(feedforward_modules=["pw"]), {"ia3_l"}),
    "ia3-in-out": (IA3Config, peft.IA3Config, dict(feedforward_modules=["conv"]), {"ia3_l"}),
    "loha": (LoHaConfig, peft.LoHaConfig, dict(r=2, alpha=3, rank_pattern={"pw": 3}),
             {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}),
    "loha-effective": (LoHaConfig, peft.LoHaConfig, dict(r=2, alpha=3, use_effective_conv2d=True),
                       {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"}),
    "lokr": (LoKrConfig, peft.LoKrConfig, dict(r=1, alpha=2), {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    "lokr-effective": (LoKrConfig, peft.LoKrConfig, dict(r=1, alpha=2, use_effective_conv2d=True, decompose_both=True),
                       {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}),
    "lokr-whole": (LoKrConfig, peft.LoKrConfig, dict(r=4, alpha=2, use_effective_conv2d=True), {"lokr_w1", "lokr_w2"}),
}


class Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, kernel_size=3, stride=2, padding=1, groups=2)  # W [6, 2, 3, 3]
        self.pw = nn.Conv2d(6, 4, kernel_size=1)                           # W [4, 6, 1, 1]

    def forward(self, x):
        return self.pw(torch.tanh(self.conv(x)))


def _pair(case):
    ours_cls, peft_cls, kw, conv_tensors = CASES[case]
    torch.manual_seed(0)
    base = Convs()
    ours = get_adapter_model(copy.deepcopy(base), ours_cls(target_modules=list(NAMES), **kw),
                             groups=ParallelGroups.single())
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_cls(target_modules=list(NAMES), **kw))
    assert isinstance(ours.model.conv, Conv2dHost) and set(ours.model.conv.adapter_tensors("default")) == conv_tensors
    scale_around = 1 if ours_cls is IA3Config else 0
    copy_into_peft(ours, theirs, NAMES, lambda shape: scale_around + 0.5 * torch.randn(shape))
    return ours, theirs


def _x():
    return torch.randn(2, 4, 7, 7, generator=torch.Generator().manual_seed(1))


def _peft_cp_by_autograd(t1, w1a, w1b, t2, w2a, w2b, scale):
    """PEFT's HadaWeightCP forward, differentiated by autograd: PEFT's hand-written backward gives
    wrong gradients for hada_w1_a and hada_w2_a (torch.autograd.gradcheck fails on them; the
    other four are right), so the oracle keeps PEFT's forward and lets torch do the backward."""
    rebuild1 = torch.einsum("i j k l, j r, i p -> p r k l", t1, w1b, w1a)
    rebuild2 = torch.einsum("i j k l, j r, i p -> p r k l", t2, w2b, w2a)
    return rebuild1 * rebuild2 * scale


def test_peft_loha_tucker_backward_is_wrong_for_w1a_w2a_only():
    from peft.tuners.loha.layer import HadaWeightCP

    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(s, dtype=torch.float64, generator=g, requires_grad=True)
          for s in ((2, 2, 3, 3), (2, 6), (2, 4), (2, 2, 3, 3), (2, 6), (2, 4))]
    upstream = torch.randn(6, 4, 3, 3, dtype=torch.float64, generator=g)
    scale = torch.tensor(1.5, dtype=torch.float64)
    theirs = torch.autograd.grad(HadaWeightCP.apply(*ts, scale), ts, upstream)
    exact = torch.autograd.grad(_peft_cp_by_autograd(*ts, scale), ts, upstream)
    wrong = [name for name, a, b in zip(("t1", "w1a", "w1b", "t2", "w2a", "w2b"), theirs, exact)
             if not torch.allclose(a, b)]
    assert wrong == ["w1a", "w2a"]


@pytest.mark.parametrize("case", CASES)
def test_outputs_and_gradients_match_peft(case, monkeypatch):
    from peft.tuners.loha import layer as peft_loha

    monkeypatch.setattr(peft_loha, "make_weight_cp", _peft_cp_by_autograd)
    ours, theirs = _pair(case)
    check_outputs_and_gradients(ours, theirs, _x())


@pytest.mark.parametrize("case", CASES)
def test_merge_matches_peft_and_unmerge_is_exact(case):
    ours, theirs = _pair(case)
    w0, plain = check_merge_and_unmerge(ours, theirs, _x(), NAMES)
    for n in NAMES:
        assert not torch.equal(getattr(plain, n).weight, w0[n][0]), n


@pytest.mark.parametrize("case", CASES)
def test_default_init_is_a_no_op(case):
    ours_cls, _, kw, _ = CASES[case]
    torch.manual_seed(0)
    base = Convs()
    x = _x()
    model = get_adapter_model(copy.deepcopy(base), ours_cls(target_modules=list(NAMES), **kw),
                              groups=ParallelGroups.single())
    assert torch.equal(model(x), base(x))


@pytest.mark.parametrize("case", ["ia3-out-in", "loha-effective", "lokr-effective"])
def test_save_pretrained_loads_in_peft_and_back(case, tmp_path):
    from parallel_adapters.adapters.model import AdapterModel

    ours, _ = _pair(case)
    ours.eval()
    x = _x()
    expected = ours(x).detach()
    ours.save_pretrained(tmp_path)
    torch.manual_seed(0)
    base = Convs()
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    close(theirs(x).detach(), expected, "PEFT from our directory")
    again = AdapterModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert type(again.peft_config["default"]) is CASES[case][0]
    close(again(x).detach(), expected, "ours from our directory")
    theirs.save_pretrained(tmp_path / "peft")  # and PEFT's own directory loads in ours
    from_peft = AdapterModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    close(from_peft(x).detach(), expected, "ours from PEFT's directory")


def test_kind_for_module_hands_conv_modules_to_the_conv_forms():
    """The variants keep their kind's name (checkpoints record "loha", ...) and take conv modules only;
    LoRA's takes them only with conv_layout="alf"."""
    from parallel_adapters import LoraConfig
    from parallel_adapters.adapters.kinds import kind_for_config, kind_for_module
    from parallel_adapters.adapters.kinds.conv import ALF_CONV, IA3_CONV, LOHA_CONV, LOKR_CONV
    from parallel_adapters.mcore.compat import linear_geometry

    conv, linear = linear_geometry(nn.Conv2d(2, 2, 3), SINGLE), linear_geometry(nn.Linear(2, 2), SINGLE)
    for config, variant in ((IA3Config(target_modules=["c"], feedforward_modules=[]), IA3_CONV),
                            (LoHaConfig(target_modules=["c"]), LOHA_CONV), (LoKrConfig(target_modules=["c"]), LOKR_CONV),
                            (LoraConfig(target_modules=["c"], conv_layout="alf"), ALF_CONV)):
        family = kind_for_config(config)
        assert kind_for_module(family, config, conv) is variant and variant.name == family.name
        assert kind_for_module(family, config, linear) is family
    peft_layout = LoraConfig(target_modules=["c"])
    assert kind_for_module(kind_for_config(peft_layout), peft_layout, conv) is kind_for_config(peft_layout)
