"""Comparing an AdapterModel with Hugging Face PEFT's own model of the same base (the oracle), at
world size 1: the same adapter values copied into PEFT, then outputs, the input gradient and every
adapter tensor's gradient compared within 1e-6 of each tensor's largest entry (fp32).  Shared by
the kind tests (tests/unit/adapters/kinds/: linear layers and nn.Conv2d)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class Two(nn.Module):
    """The kind tests' base: q_proj (in_f -> out_f), tanh, v_proj (out_f -> in_f), PEFT's target names."""

    def __init__(self, in_f: int = 16, out_f: int = 12, v_bias: bool = True):
        super().__init__()
        self.q_proj = nn.Linear(in_f, out_f)
        self.v_proj = nn.Linear(out_f, in_f, bias=v_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.v_proj(torch.tanh(self.q_proj(x)))


def close(a: torch.Tensor, b: torch.Tensor, name: str, tol: float = 1e-6) -> None:
    error, scale = (a - b).abs().max().item(), max(1.0, b.abs().max().item())
    assert error <= tol * scale, f"{name}: {error} (largest entry {scale})"


def grads(model: torch.nn.Module, x: torch.Tensor, names: list[str]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """y and [dx, d(each named parameter)] for a fixed, non-uniform upstream gradient."""
    params = dict(model.named_parameters())
    x = x.clone().requires_grad_()
    y = model(x)
    y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
    return y.detach(), [x.grad] + [params[n].grad.clone() for n in names]


def adapter_names(model: torch.nn.Module, prefix: str) -> list[str]:
    return sorted(n for n, p in model.named_parameters() if p.requires_grad and n.startswith(prefix))


def copy_into_peft(ours, theirs, modules, fill: Callable[[torch.Size], torch.Tensor]) -> None:
    """Give every adapter tensor of `modules` the value `fill(shape)`, ours and PEFT's alike (PEFT's
    shapes checked equal to ours; PEFT holds them in ParameterDicts under the same names)."""
    for name in modules:
        o, p = ours.model.get_submodule(name), theirs.base_model.model.get_submodule(name)
        for tensor_name, param in o.adapter_tensors("default").items():
            theirs_param = getattr(p, tensor_name)["default"]
            assert theirs_param.shape == param.shape, (name, tensor_name, tuple(theirs_param.shape), tuple(param.shape))
            with torch.no_grad():
                param.copy_(fill(param.shape))
                theirs_param.copy_(param)


def check_outputs_and_gradients(ours, theirs, x: torch.Tensor) -> None:
    """The same trainable tensors under PEFT's names, then equal outputs and gradients."""
    ours_names = adapter_names(ours, "model.")
    theirs_names = [n.replace("base_model.model.", "model.").replace(".default", ".default.weight")
                    for n in adapter_names(theirs, "base_model.")]
    assert ours_names == sorted(theirs_names) and ours_names  # the same tensors, PEFT's names
    y_ours, g_ours = grads(ours, x, ours_names)
    y_theirs, g_theirs = grads(theirs, x, adapter_names(theirs, "base_model."))
    close(y_ours, y_theirs, "y")
    theirs_by_name = dict(zip(theirs_names, g_theirs[1:]))
    close(g_ours[0], g_theirs[0], "dx")
    for name, grad in zip(ours_names, g_ours[1:]):
        close(grad, theirs_by_name[name], name)


def check_merge_and_unmerge(ours, theirs, x: torch.Tensor, names) -> tuple[dict, torch.nn.Module]:
    """merge_adapter keeps the output, unmerge_adapter restores every base weight and bias exactly,
    and merge_and_unload gives PEFT's merged weights and biases.  Returns ({name: (weight, bias)
    before}, our merged plain model) for the kind's own checks."""
    before = ours(x).detach()
    w0 = {n: (getattr(ours.model, n).weight.clone(), getattr(ours.model, n).bias.clone()) for n in names}
    ours.merge_adapter()
    close(ours(x), before, "merged output")
    ours.unmerge_adapter()
    for n in names:
        layer = getattr(ours.model, n)
        assert torch.equal(layer.weight, w0[n][0]) and torch.equal(layer.bias, w0[n][1]), n
    plain, peft_plain = ours.merge_and_unload(), theirs.merge_and_unload()
    for n in names:
        close(getattr(plain, n).weight, getattr(peft_plain, n).weight, f"{n}.weight")
        close(getattr(plain, n).bias, getattr(peft_plain, n).bias, f"{n}.bias")
    return w0, plain
