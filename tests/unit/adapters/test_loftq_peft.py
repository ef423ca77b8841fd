"""LoftQ ("loftq") at world size 1 on plain nn.Linear layers against Hugging Face PEFT's own
`LoraLayer.loftq_init` / `loftq_init` (the oracle), float32.

The installed PEFT runs LoftQ only through bitsandbytes on a CUDA/XPU device (its former
bnb-free NFQuantizer is gone), and its LoraConfig wants scipy for it; neither is here.  So PEFT's
loop is driven with a stand-in `bitsandbytes` whose NF4 is bitsandbytes' documented one (blocks of
64 consecutive row-major elements, absmax scale, nearest value of the published NF4 table, written
here independently of decompose/quantize.py) and with its "cuda" tensors kept on the CPU.
Everything else (the alternating loop, the SVD split sqrt(S) on both factors, no division by the
scaling, the base replaced by the de-quantised weight) is PEFT's code.

Checked: A, B, the base weight, and the layer's output at init (which shows the scaling is handled
as PEFT: Q x + s B A x, s = 2 here) within 1e-5 of PEFT's.  Sign convention: PEFT keeps LAPACK's
signs; ours (decompose/loftq.py, via pissa's) makes the largest entry of each row of A positive, so
each pair (B[:, j], A[j]) is flipped onto PEFT's before comparing (Q and the output do not depend on it).
"""
import copy
import sys
import types

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from parallel_adapters import LoraConfig, ParallelGroups, get_adapter_model
from parallel_adapters.config import LoftQConfig
from tests.unit.decompose.test_quantize import BNB_NF4

peft = pytest.importorskip("peft")

TOL = 1e-5
R, ALPHA = 4, 8


def _nf4_reference(w):
    blocks = w.reshape(-1, 64)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    codes = ((blocks / absmax)[..., None] - torch.tensor(BNB_NF4)).abs().argmin(-1)
    return codes, (absmax, w.shape)


class _Params4bit:
    def __init__(self, data, requires_grad=False, compress_statistics=False, quant_type="nf4"):
        assert quant_type == "nf4" and not compress_statistics
        self.data, self.quant_state = _nf4_reference(data)

    def to(self, device):
        return self


def _dequantize_4bit(codes, state):
    absmax, shape = state
    return (torch.tensor(BNB_NF4)[codes] * absmax).reshape(shape)


class _CudaOnCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = {k: ("cpu" if k == "device" and v in ("cuda", "xpu") else v) for k, v in (kwargs or {}).items()}
        args = tuple("cpu" if isinstance(a, str) and a in ("cuda", "xpu") else a for a in args)
        return func(*args, **kwargs)


@pytest.fixture
def peft_loftq(monkeypatch):
    from peft.utils import loftq_utils

    bnb = types.SimpleNamespace(nn=types.SimpleNamespace(Params4bit=_Params4bit),
                                functional=types.SimpleNamespace(dequantize_4bit=_dequantize_4bit))
    monkeypatch.setattr(loftq_utils, "is_bnb_available", lambda: True)
    monkeypatch.setattr(loftq_utils, "is_bnb_4bit_available", lambda: True)
    monkeypatch.setattr(loftq_utils, "clear_device_cache", lambda: None)

    def run(layer, bits, iters):  # the stand-in only inside PEFT's loftq_init (get_peft_model probes for bnb)
        with monkeypatch.context() as m, _CudaOnCpu():
            m.setitem(sys.modules, "bitsandbytes", bnb)
            layer.loftq_init("default", types.SimpleNamespace(loftq_config={"loftq_bits": bits, "loftq_iter": iters}))
    return run


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 16)
        self.down = nn.Linear(16, 48, bias=False)  # 768 elements: 12 blocks spanning rows

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _aligned(ours_a, ours_b, peft_a, peft_b):
    signs = torch.sign((ours_a * peft_a).sum(dim=1))
    return ours_a * signs[:, None], ours_b * signs


@pytest.mark.parametrize("iters", [1, 2])
def test_loftq_matches_peft(peft_loftq, iters):
    torch.manual_seed(0)
    base = Stack()
    kw = dict(r=R, lora_alpha=ALPHA, target_modules=["up", "down"])
    ours = get_adapter_model(copy.deepcopy(base), LoraConfig(**kw, init_lora_weights="loftq",
                                                             loftq_config=LoftQConfig(4, iters)),
                             groups=ParallelGroups.single())
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    x = torch.randn(5, 64)
    for name, width in (("up", 64), ("down", 16)):
        o, p = getattr(ours.model, name), getattr(theirs.base_model.model, name)
        peft_loftq(p, 4, iters)
        pa, pb = p.lora_A["default"].weight.detach(), p.lora_B["default"].weight.detach()
        a, b = _aligned(o.lora_A["default"].weight.detach(), o.lora_B["default"].weight.detach(), pa, pb)
        for what, got, want in (("A", a, pa), ("B", b, pb), ("Q", o.weight.detach(), p.base_layer.weight.detach())):
            error = (got - want).abs().max().item()
            assert error <= TOL, f"{name} {what} (loftq_iter={iters}): {error}"
        assert (o.weight - getattr(base, name).weight).abs().max() > 1e-3  # the base was quantised
        xi = x[:, :width]
        error = (o(xi) - p(xi)).abs().max().item()
        assert error <= TOL, f"{name}: output at init {error}"


def test_loftq_config_rules():
    with pytest.raises(ValueError, match="loftq_config"):
        LoraConfig(target_modules=["up"], init_lora_weights="loftq")
    with pytest.raises(ValueError, match="loftq_bits must be 2, 4 or 8"):
        LoftQConfig(loftq_bits=3)
    with pytest.raises(ValueError, match="loftq_iter"):
        LoftQConfig(loftq_iter=0)
    c = LoraConfig(target_modules=["up"], init_lora_weights="loftq", loftq_config=LoftQConfig(2, 3))
    assert LoraConfig.from_dict(c.to_dict()) == c and c.to_dict()["loftq_config"] == {"loftq_bits": 2,
                                                                                       "loftq_iter": 3}


def test_a_block_straddling_a_shard_is_refused_before_any_change():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Linear(64, 16)
            self.odd = nn.Linear(10, 9)  # 90 elements: not a multiple of 64

    model = Odd()
    before = model.up.weight.detach().clone()
    with pytest.raises(ValueError, match=r"odd.*\[9, 10\].*TP size 1.*multiple of 64"):
        get_adapter_model(model, LoraConfig(r=2, target_modules=["up", "odd"], init_lora_weights="loftq",
                                            loftq_config=LoftQConfig()))
    assert torch.equal(model.up.weight, before)
