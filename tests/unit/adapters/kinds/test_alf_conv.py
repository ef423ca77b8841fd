"""LoRA on nn.Conv2d in ALF's balanced layout (LoraConfig(conv_layout="alf")) against a dense float64
reference written from ALF's definition (alf.pretrained_models.model_adapters.lora.Conv2dAdapter):
W [O, Ig, kh, kw] read as an (O kh) x (Ig kw) matrix, A [r, Ig kw], B [O kh, r],
delta[o, i, u, v] = sum_r B.reshape(O, r, kh)[o, r, u] A.reshape(r, Ig, kw)[r, i, v], scaled by
weight / r (one full matrix A [O kh, Ig kw], delta = A.reshape(W), scaled by weight, when the rank is
not low).  y = conv(x, W + s delta) + b.  Kernels are non-square with unequal strides and paddings,
so swapping kh and kw fails; a grouped conv and padding="same" take ALF's one-conv path, the others
its two thin convs.  Checked: forward, input gradient, adapter gradients, merge (exact weights,
unmerge restores the base bit for bit), detach (the base back, the adapter tensors kept), ALF's init.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from parallel_adapters import LoraConfig, ParallelGroups, get_adapter_model

SINGLE = ParallelGroups.single()
LAYERS = {  # name: (nn.Conv2d arguments, r, ALF keeps two factors)
    "two_stage": (dict(in_channels=4, out_channels=3, kernel_size=(3, 2), stride=(2, 1), padding=(1, 2)), 2, True),
    "grouped": (dict(in_channels=4, out_channels=6, kernel_size=(2, 3), padding=(0, 1), groups=2), 2, True),
    "same": (dict(in_channels=4, out_channels=3, kernel_size=(3, 1), padding="same"), 1, True),
    "full": (dict(in_channels=2, out_channels=2, kernel_size=(1, 2)), 3, False),  # 3 > 2*4/(2+4): one matrix
}
WEIGHT = 1.5  # ALF's `weight` (our lora_alpha)


class Net(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.conv = nn.Conv2d(**LAYERS[layer][0])

    def forward(self, x):
        return self.conv(x)


def _reference_delta(conv: nn.Conv2d, a: torch.Tensor, b: torch.Tensor | None, r: int) -> torch.Tensor:
    """ALF's weight update, one rank-one kernel per component (float64)."""
    out, in_g, kh, kw = conv.weight.shape
    if b is None:
        return WEIGHT * a.reshape(out, in_g, kh, kw)
    wa, wb = a.reshape(r, in_g, kw), b.reshape(out, r, kh)
    delta = sum(wb[:, k, None, :, None] * wa[k][None, :, None, :] for k in range(r))
    return WEIGHT / r * delta


def _adapted(layer, seed=0):
    torch.manual_seed(seed)
    base = Net(layer).double()
    r = LAYERS[layer][1]
    model = get_adapter_model(Net(layer).double(), LoraConfig(r=r, lora_alpha=WEIGHT, target_modules=["conv"],
                                                             conv_layout="alf", init_lora_weights=False), groups=SINGLE)
    model.model.conv.weight.data.copy_(base.conv.weight)
    model.model.conv.bias.data.copy_(base.conv.bias)
    return base, model


def _x(layer):
    channels = LAYERS[layer][0]["in_channels"]
    return torch.randn(2, channels, 7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("layer", LAYERS)
def test_forward_and_gradients_match_the_dense_reference(layer):
    base, model = _adapted(layer)
    r, low = LAYERS[layer][1], LAYERS[layer][2]
    host = model.model.conv
    tensors = host.adapter_tensors("default")
    assert sorted(tensors) == (["alf_A", "alf_B"] if low else ["alf_A"])
    out, in_g, kh, kw = base.conv.weight.shape
    assert tensors["alf_A"].shape == ((r, in_g * kw) if low else (out * kh, in_g * kw))
    assert host.scaling["default"] == (WEIGHT / r if low else WEIGHT)
    a = tensors["alf_A"].detach().clone().requires_grad_()
    b = tensors["alf_B"].detach().clone().requires_grad_() if low else None
    x = _x(layer)
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    conv = base.conv
    y_ref = F.conv2d(x_ref, conv.weight + _reference_delta(conv, a, b, r), conv.bias, conv.stride, conv.padding,
                     conv.dilation, conv.groups)
    y = model(x_ours)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    upstream = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    y_ref.backward(upstream)
    y.backward(upstream)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tensors["alf_A"].grad, a.grad, rtol=1e-12, atol=1e-12)
    if low:
        torch.testing.assert_close(tensors["alf_B"].grad, b.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layer", LAYERS)
def test_merge_is_exact_and_unmerge_restores_the_base(layer):
    base, model = _adapted(layer)
    r = LAYERS[layer][1]
    tensors = model.model.conv.adapter_tensors("default")
    expected = base.conv.weight + _reference_delta(base.conv, tensors["alf_A"], tensors.get("alf_B"), r)
    x = _x(layer)
    before = model(x).detach()
    model.merge_adapter()
    torch.testing.assert_close(model.model.conv.weight, expected.detach(), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(model(x), before, rtol=1e-12, atol=1e-12)
    model.unmerge_adapter()
    assert torch.equal(model.model.conv.weight, base.conv.weight) and torch.equal(model.model.conv.bias, base.conv.bias)
    merged = model.merge_and_unload()
    assert type(merged.conv) is nn.Conv2d
    torch.testing.assert_close(merged.conv.weight, expected.detach(), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("merged", [False, True])
def test_detach_puts_the_base_back_and_keeps_the_adapter(merged):
    base, model = _adapted("two_stage")
    kept_values = {n: p.detach().clone() for n, p in model.model.named_parameters() if p.requires_grad}
    if merged:
        model.merge_adapter()
    x = _x("two_stage")
    kept = model.detach()
    assert type(model.model.conv) is nn.Conv2d
    assert torch.equal(model.model.conv.weight, base.conv.weight)  # unmerged first, as ALF
    assert torch.equal(model(x), base(x))
    assert sorted(kept) == ["conv.alf_A.default.weight", "conv.alf_B.default.weight"]
    for name, tensor in kept.items():
        assert torch.equal(tensor, kept_values[name]), name


def test_alf_init_is_a_no_op_and_other_inits_are_refused(tmp_path):
    torch.manual_seed(0)
    base = Net("two_stage")
    model = get_adapter_model(Net("two_stage"), LoraConfig(r=2, target_modules=["conv"], conv_layout="alf"),
                              groups=SINGLE)
    model.model.conv.load_state_dict(base.conv.state_dict(), strict=False)
    t = model.model.conv.adapter_tensors("default")
    bound = (6 / (t["alf_A"].shape[0] + t["alf_A"].shape[1])) ** 0.5  # Xavier-uniform
    assert torch.equal(t["alf_B"], torch.zeros_like(t["alf_B"])) and 0 < t["alf_A"].abs().max() <= bound
    x = torch.randn(1, 4, 5, 5)
    assert torch.equal(model(x), base(x))
    with pytest.raises(ValueError, match="LoraConfig.init_lora_weights='gaussian'"):
        get_adapter_model(Net("two_stage"), LoraConfig(target_modules=["conv"], conv_layout="alf",
                                                       init_lora_weights="gaussian"), groups=SINGLE)
    with pytest.raises(ValueError, match="LoraConfig.conv_layout"):
        LoraConfig(conv_layout="balanced")
    with pytest.raises(ValueError, match="no PEFT form"):
        model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="LoraConfig.conv_layout='alf'"):
        model.add_weighted_adapter(["default"], [1.0], "combined", combination_type="linear")


def test_sharded_checkpoint_round_trips_the_alf_factors(tmp_path):
    """ALF's adapter has no PEFT form; our checkpoint keeps it (kind "lora", conv_layout "alf")."""
    import json

    from parallel_adapters import load_checkpoint, save_checkpoint

    _, model = _adapted("grouped")
    saved = {n: t.local.clone() for n, t in model.adapter_state_dict().items()}
    assert sorted(saved) == ["conv.alf_A.default.weight", "conv.alf_B.default.weight"]
    save_checkpoint(model, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "adapter_config.json").read_text())
    assert (config["adapter_kind"], config["conv_layout"]) == ("lora", "alf")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    load_checkpoint(model, tmp_path / "ckpt")
    for name, tensor in model.adapter_state_dict().items():
        assert torch.equal(tensor.local, saved[name]), name
