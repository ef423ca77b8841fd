"""PiSSA ("pissa", "pissa_niter_K") and OLoRA ("olora") at world size 1 on plain nn.Linear layers
against Hugging Face PEFT's own `pissa_init` / `olora_init` (the oracle), float32, on weights with
planted spectra (clear gaps after the r-th singular value, so the top-r triplets are well defined
and a randomized SVD finds them too).

Checked: A, B and the residual base weight W - s B A within 1e-5 of PEFT's, up to PEFT's sign
convention: PEFT keeps LAPACK's signs; ours (decompose/pissa.py, decompose/olora.py) makes the
largest entry of each row of A positive (PiSSA) or A[j, j] >= 0 (OLoRA), so each pair
(B[:, j], A[j]) is compared after flipping it onto PEFT's (the residual does not depend on signs).
With use_dora, the magnitude equals PEFT's (the row norms of the residual plus s B A).  Also the
model's output is unchanged by the initialisation (W_res + s B A = W), and the config errors.
"""
import copy

import pytest
import torch
from torch import nn

from parallel_adapters import LoraConfig, ParallelGroups, get_adapter_model
from parallel_adapters.adapters.model import AdapterModel
from parallel_adapters.config import EvaConfig, decomposition_init

peft = pytest.importorskip("peft")

TOL = 1e-5
R, ALPHA = 4, 16  # scaling 4: PiSSA divides S by it, OLoRA does not


def planted(out_f, in_f, seed):
    """U diag(S) V^T with S = 9, 7, 5, 3 then a tail below 0.05 (gap ratio < 0.02 after the 4th)."""
    g = torch.Generator().manual_seed(seed)
    k = min(out_f, in_f)
    u = torch.linalg.qr(torch.randn(out_f, k, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(in_f, k, generator=g, dtype=torch.float64)).Q
    s = torch.cat([torch.tensor([9.0, 7.0, 5.0, 3.0], dtype=torch.float64),
                   0.05 * 0.8 ** torch.arange(k - 4, dtype=torch.float64)])
    return (u * s) @ v.T


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(24, 40)
        self.down = nn.Linear(40, 32, bias=False)
        with torch.no_grad():
            self.up.weight.copy_(planted(40, 24, 1))
            self.down.weight.copy_(planted(32, 40, 2))

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _pair(init, use_dora=False):
    torch.manual_seed(0)
    base = Stack()
    kw = dict(r=R, lora_alpha=ALPHA, target_modules=["up", "down"], init_lora_weights=init, use_dora=use_dora)
    ours = get_adapter_model(copy.deepcopy(base), LoraConfig(**kw), groups=ParallelGroups.single())
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    return base, ours, theirs


def _aligned(ours_a, ours_b, peft_a, peft_b):
    """Our pairs flipped onto PEFT's signs: (B[:, j], A[j]) -> -(B[:, j], A[j]) where A[j] points away."""
    signs = torch.sign((ours_a * peft_a).sum(dim=1))
    return ours_a * signs[:, None], ours_b * signs


def _assert_close(got, want, what):
    error = (got - want).abs().max().item()
    assert error <= TOL, f"{what}: {error}"


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_factors_and_residual_match_peft(init):
    base, ours, theirs = _pair(init)
    for name in ("up", "down"):
        o, p = getattr(ours.model, name), getattr(theirs.base_model.model, name)
        a, b = o.lora_A["default"].weight.detach(), o.lora_B["default"].weight.detach()
        pa, pb = p.lora_A["default"].weight.detach(), p.lora_B["default"].weight.detach()
        assert a.dtype == pa.dtype == torch.float32 and b.dtype == pb.dtype
        a, b = _aligned(a, b, pa, pb)
        _assert_close(a, pa, f"{init} {name} A")
        _assert_close(b, pb, f"{init} {name} B")
        _assert_close(o.weight.detach(), p.base_layer.weight.detach(), f"{init} {name} residual")
        assert (o.weight - getattr(base, name).weight).abs().max() > 0.1  # the base shard was rewritten
    x = torch.randn(5, 24)
    _assert_close(ours(x), base(x), f"{init}: output at init")  # W_res + s B A = W


def test_our_sign_convention():
    _, ours, _ = _pair("pissa")
    a = ours.model.up.lora_A["default"].weight.detach()
    rows = a.abs().argmax(dim=1)
    assert (a.gather(1, rows[:, None]) > 0).all()
    _, ours, _ = _pair("olora")
    assert (torch.diagonal(ours.model.up.lora_A["default"].weight.detach()) >= 0).all()


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_dora_magnitude_matches_peft(init):
    _, ours, theirs = _pair(init, use_dora=True)
    for name in ("up", "down"):
        o, p = getattr(ours.model, name), getattr(theirs.base_model.model, name)
        _assert_close(o.lora_magnitude_vector["default"].weight.detach(),
                      p.lora_magnitude_vector["default"].weight.detach(), f"{init} {name} magnitude")
        _assert_close(o.weight.detach(), p.base_layer.weight.detach(), f"{init} {name} residual")


def test_bfloat16_base_keeps_float32_factors_and_bfloat16_residual():
    """PEFT rounds the factors through bfloat16 (it moves them to the base's dtype before autocasting
    them back to float32) after computing the residual from the unrounded ones; ours stay float32 and
    the residual is computed from the factors as stored, so W_res + s B A rounds to W."""
    base = Stack().to(torch.bfloat16)
    kw = dict(r=R, lora_alpha=ALPHA, target_modules=["up"], init_lora_weights="pissa")
    ours = get_adapter_model(copy.deepcopy(base), LoraConfig(**kw))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    o, p = ours.model.up, theirs.base_model.model.up
    assert o.weight.dtype == torch.bfloat16 and o.lora_A["default"].weight.dtype == torch.float32
    a, b = _aligned(o.lora_A["default"].weight.detach(), o.lora_B["default"].weight.detach(),
                    p.lora_A["default"].weight.detach(), p.lora_B["default"].weight.detach())
    for got, want in ((a, p.lora_A["default"].weight), (b, p.lora_B["default"].weight),
                      (o.weight.float(), p.base_layer.weight.float())):  # a bfloat16 step of the largest entry
        want = want.detach()
        assert (got - want).abs().max() <= 2.0 ** -8 * want.abs().max()
    restored = (o.weight.float() + o.scaling["default"] * b @ a).bfloat16()
    assert (restored.float() - base.up.weight.float()).abs().max() <= 2.0 ** -7 * base.up.weight.float().abs().max()


def test_config_accepts_peft_values_and_refuses_others():
    assert decomposition_init("pissa") == ("pissa", None)
    assert decomposition_init("pissa_niter_16") == ("pissa", 16)
    assert decomposition_init("olora") == ("olora", None)
    assert decomposition_init("corda") == ("corda", None)  # needs data: eva/corda.py
    assert decomposition_init(True) is None and decomposition_init("eva") is None
    for bad in ("pissa_niter_", "pissa_niter_x", "PiSSA", "CorDA"):
        with pytest.raises(ValueError, match="init_lora_weights"):
            LoraConfig(init_lora_weights=bad)
    with pytest.raises(ValueError, match="eva_config.*init_lora_weights='olora'"):
        LoraConfig(init_lora_weights="olora", eva_config=EvaConfig())
    assert LoraConfig(init_lora_weights="pissa", use_dora=True).use_dora  # PEFT allows DoRA with PiSSA


def test_embedding_target_is_refused_naming_the_module():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8))
    with pytest.raises(ValueError, match="module 0: .*'pissa' applies to linear layers only"):
        get_adapter_model(model, LoraConfig(r=2, target_modules=["0"], init_lora_weights="pissa"),
                          groups=ParallelGroups.single())


def test_from_pretrained_keeps_the_residual_base(tmp_path):
    _, ours, _ = _pair("pissa")
    ours.save_pretrained(tmp_path)
    plain = Stack()  # the residual base, as the caller would have saved it
    with torch.no_grad():
        for name in ("up", "down"):
            getattr(plain, name).weight.copy_(getattr(ours.model, name).weight)
    loaded = AdapterModel.from_pretrained(plain, tmp_path)
    for name in ("up", "down"):
        assert torch.equal(getattr(loaded.model, name).weight, getattr(ours.model, name).weight)
        assert torch.equal(getattr(loaded.model, name).lora_A["default"].weight,
                           getattr(ours.model, name).lora_A["default"].weight)


def test_refresh_initial_tensors_follows_new_factors():
    """The host step that gives DoRA its magnitude from the residual and the new factors."""
    model = get_adapter_model(Stack(), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["up"], use_dora=True,
                                                  init_lora_weights=False), groups=ParallelGroups.single())
    host = model.model.up
    tensors = {n: t.detach().clone() for n, t in host.adapter_tensors("default").items()}
    tensors["lora_B"] = torch.randn_like(tensors["lora_B"])
    host.replace_tensors("default", tensors, host.hparams("default"))
    host.refresh_initial_tensors("default")
    s, a, b = host.scaling["default"], tensors["lora_A"], tensors["lora_B"]
    _assert_close(host.lora_magnitude_vector["default"].weight.detach(),
                  torch.linalg.norm(host.weight.detach() + s * b @ a, dim=1), "magnitude")
