"""DoRA at world size 1 on plain nn.Linear layers against Hugging Face PEFT's own DoRA (the oracle):
the same base and factor values, fp32.  Outputs and gradients (input, A, B, magnitude) within
1e-6 of each tensor's largest entry (float32 rounding of sums of ~10 terms) in eval and in training with dropout (PEFT is handed a dropout that draws exactly our masks:
the same SeededDropout function and seed, so both draw the same mask per call); the initial
magnitude is PEFT's weight norm; merge, unmerge and merge_and_unload give PEFT's merged weight.
Also AdapterModel's handling of the magnitude (trainable, state dict, switch, disable, delete).
"""
import copy

import pytest
import torch
from torch import nn

from parallel_adapters import LoraConfig, ParallelGroups, get_adapter_model
from parallel_adapters.adapters.hosts.dropout import SeededDropout
from parallel_adapters.adapters.kinds.dora import MAGNITUDE
from parallel_adapters.distributed.sharding import REPLICATED
from tests.helpers import peft_oracle

peft = pytest.importorskip("peft")

TOL = dict(atol=1e-6, rtol=1e-6)
IN_F, OUT_F, R = 16, 12, 4


class Two(peft_oracle.Two):
    def __init__(self):
        super().__init__(IN_F, OUT_F, v_bias=False)


class _SameMasks(nn.Module):
    """PEFT's dropout slot, drawing with our function from our seed (so the masks agree)."""

    def __init__(self, ours: SeededDropout):
        super().__init__()
        self.draw = SeededDropout(ours.p, ours.seed)

    def forward(self, x):
        return self.draw(x)


def _close(a, b, name):
    error, scale = (a - b).abs().max().item(), max(1.0, b.abs().max().item())
    assert error <= 1e-6 * scale, f"{name}: {error} (largest entry {scale})"


def _pair(dropout=0.0):
    torch.manual_seed(0)
    base = Two()
    kw = dict(r=R, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, use_dora=True,
              lora_dropout=dropout)
    ours = get_adapter_model(copy.deepcopy(base), LoraConfig(**kw), groups=ParallelGroups.single())
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    for name in ("q_proj", "v_proj"):
        o, p = getattr(ours.model, name), getattr(theirs.base_model.model, name)
        with torch.no_grad():
            p.lora_A["default"].weight.copy_(o.lora_A["default"].weight)
            p.lora_B["default"].weight.copy_(o.lora_B["default"].weight)
            dora = p.lora_magnitude_vector["default"]
            lora_weight = o.lora_B["default"].weight @ o.lora_A["default"].weight
            peft_norm = dora.get_weight_norm(p.base_layer.weight, lora_weight, p.scaling["default"])
            torch.testing.assert_close(o.lora_magnitude_vector["default"].weight, peft_norm, **TOL)  # the init
            m = peft_norm * (1 + 0.5 * torch.rand(peft_norm.shape))  # move away from f = 1
            dora.weight.copy_(m)
            o.lora_magnitude_vector["default"].weight.copy_(m)
        if dropout:
            p.lora_dropout["default"] = _SameMasks(o._dropout["default"])
    return ours, theirs


def _grads(model, x, names):
    params = dict(model.named_parameters())
    x = x.clone().requires_grad_()
    y = model(x)
    y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
    grads = [x.grad] + [params[n].grad.clone() for n in names]
    for p in params.values():
        p.grad = None
    return y.detach(), grads


def _names(prefix):
    return [f"{prefix}{m}.{t}.default.weight" for m in ("q_proj", "v_proj")
            for t in ("lora_A", "lora_B", "lora_magnitude_vector")]


@pytest.mark.parametrize("dropout", [0.0, 0.4])
def test_outputs_and_gradients_match_peft(dropout):
    ours, theirs = _pair(dropout)
    ours.train(), theirs.train()
    x = torch.randn(3, 5, IN_F)
    for _ in range(2):  # fresh masks per call, still the same on both sides
        y_o, g_o = _grads(ours, x, _names("model."))
        y_p, g_p = _grads(theirs, x, _names("base_model.model."))
        torch.testing.assert_close(y_o, y_p, **TOL)
        for a, b, name in zip(g_o, g_p, ["x"] + _names("")):
            _close(a, b, name)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x), **TOL)
    if dropout:  # the dropout path differs from the eval path (it is not a no-op)
        ours.train()
        assert not torch.allclose(ours(x), theirs.eval()(x), atol=1e-3)


def test_merge_unmerge_and_unload_match_peft():
    ours, theirs = _pair()
    ours.eval(), theirs.eval()
    x = torch.randn(4, IN_F)
    before = ours(x).detach()
    w0 = {n: getattr(ours.model, n).weight.detach().clone() for n in ("q_proj", "v_proj")}
    ours.merge_adapter()
    theirs.merge_adapter()
    for name in ("q_proj", "v_proj"):
        torch.testing.assert_close(getattr(ours.model, name).weight,
                                   getattr(theirs.base_model.model, name).base_layer.weight, **TOL)
    torch.testing.assert_close(ours(x), before, **TOL)
    ours.unmerge_adapter()
    assert all(torch.equal(getattr(ours.model, n).weight, w) for n, w in w0.items())  # exact
    plain = ours.merge_and_unload()
    assert isinstance(plain.q_proj, nn.Linear)
    torch.testing.assert_close(plain(x), before, **TOL)
    torch.testing.assert_close(plain.q_proj.weight, theirs.base_model.model.q_proj.base_layer.weight, **TOL)


def test_adapter_model_handles_the_magnitude():
    torch.manual_seed(1)
    model = get_adapter_model(Two(), LoraConfig(r=R, target_modules=["q_proj"], use_dora=True),
                              groups=ParallelGroups.single())
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == [f"model.q_proj.{t}.default.weight" for t in ("lora_A", "lora_B", MAGNITUDE)]
    state = model.adapter_state_dict()
    magnitude = state[f"q_proj.{MAGNITUDE}.default.weight"]
    assert magnitude.spec == REPLICATED and magnitude.global_shape == (OUT_F,)
    layer = model.model.q_proj
    torch.testing.assert_close(magnitude.local, layer.weight.norm(dim=1), atol=1e-6, rtol=0)  # B = 0: ||W||
    x = torch.randn(2, IN_F)
    with torch.no_grad():
        base_out = model.model.v_proj(torch.tanh(torch.nn.functional.linear(x, layer.weight, layer.bias)))
        torch.testing.assert_close(model(x), base_out, **TOL)  # B = 0, m = ||W||: the base model
        layer.lora_magnitude_vector["default"].weight.mul_(2.0)
        assert not torch.allclose(model(x), base_out)
        with model.disable_adapter():
            torch.testing.assert_close(model(x), base_out, atol=0, rtol=0)
        model.add_adapter("plain", LoraConfig(r=2, target_modules=["q_proj"]))
        assert set(layer.kinds) == {"default", "plain"} and layer.kinds["plain"].name == "lora"
        model.set_adapter("plain")
        assert not any(p.requires_grad for p in layer.lora_magnitude_vector.parameters())
        torch.testing.assert_close(model(x), base_out, **TOL)  # LoRA with B = 0
        model.set_adapter("default")
        model.delete_adapter("plain")
        model.delete_adapter("default")
        assert not list(layer.lora_magnitude_vector.parameters())


def test_sharded_checkpoint_round_trips_the_magnitude(tmp_path):
    """The generic sharded checkpoint saves and restores every declared tensor, the magnitude too."""
    from parallel_adapters import load_checkpoint, save_checkpoint

    ours, _ = _pair()
    saved = {n: t.local.clone() for n, t in ours.adapter_state_dict().items()}
    assert f"q_proj.{MAGNITUDE}.default.weight" in saved
    save_checkpoint(ours, tmp_path / "ckpt")
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(1.0)
    load_checkpoint(ours, tmp_path / "ckpt")
    for name, tensor in ours.adapter_state_dict().items():
        assert torch.equal(tensor.local, saved[name]), name
