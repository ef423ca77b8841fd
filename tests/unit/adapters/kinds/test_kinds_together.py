"""Several named adapters of different kinds on one model (world size 1, plain nn.Linear, fp32):
LoHa, LoKr and IA3 (and LoRA) under their own names, each with its rank_pattern / alpha_pattern
where the kind has them.  PEFT allows one kind per adapter name but not several kinds in one
PeftModel, so the oracle for each adapter is PEFT's own model of that kind alone with the same
tensor values.  Checked for each name: set_adapter makes it the only running and trainable
adapter, with PEFT's outputs and gradients (1e-6 of the largest entry); disable_adapter gives the
base; merge_adapter gives PEFT's merged weights and outputs, unmerge restores the base bit-exactly;
delete_adapter removes its tensors and leaves the others' outputs; merge_and_unload of one adapter
equals PEFT's; unload hands back the untouched base.
"""
import copy

import pytest
import torch
from torch import nn

from parallel_adapters import IA3Config, LoHaConfig, LoKrConfig, LoraConfig, ParallelGroups, get_adapter_model
from tests.helpers.peft_oracle import close

peft = pytest.importorskip("peft")

Q, V, DOWN = "q_proj", "v_proj", "down_proj"
KW = {  # name: (our config class, PEFT's, fields both take)
    "loha": (LoHaConfig, peft.LoHaConfig, dict(r=2, alpha=3, target_modules=[Q, V], rank_pattern={V: 3},
                                               alpha_pattern={V: 5})),
    "lokr": (LoKrConfig, peft.LoKrConfig, dict(r=1, alpha=2, decompose_both=True, target_modules=[V, DOWN],
                                               rank_pattern={DOWN: 2}, alpha_pattern={DOWN: 4})),
    "ia3": (IA3Config, peft.IA3Config, dict(target_modules=[Q, DOWN], feedforward_modules=[DOWN])),
    "lora": (LoraConfig, peft.LoraConfig, dict(r=2, lora_alpha=4, target_modules=[Q, DOWN], rank_pattern={Q: 3},
                                               alpha_pattern={Q: 6})),
}


class Three(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.v_proj, self.down_proj = nn.Linear(16, 12), nn.Linear(12, 16), nn.Linear(16, 8)

    def forward(self, x):
        return self.down_proj(torch.tanh(self.v_proj(torch.tanh(self.q_proj(x)))))


@pytest.fixture()
def models():
    """Ours with all four adapters (random values); PEFT's model per kind with the same values."""
    torch.manual_seed(0)
    base = Three()
    ours, theirs = None, {}
    for name, (ours_cls, peft_cls, kw) in KW.items():
        if ours is None:
            ours = get_adapter_model(copy.deepcopy(base), ours_cls(**kw), adapter_name=name,
                                     groups=ParallelGroups.single())
        else:
            ours.add_adapter(name, ours_cls(**kw))
        theirs[name] = peft.get_peft_model(copy.deepcopy(base), peft_cls(**kw)).eval()
        for module in kw["target_modules"]:
            o, p = ours.model.get_submodule(module), theirs[name].base_model.model.get_submodule(module)
            for tensor_name, param in o.adapter_tensors(name).items():
                with torch.no_grad():
                    param.copy_((1 if name == "ia3" else 0) + 0.5 * torch.randn(param.shape))
                    target = getattr(p, tensor_name)["default"]  # LoRA's factors: nn.Linear modules
                    (target.weight if isinstance(target, nn.Module) else target).copy_(param)
    return base, ours.eval(), theirs


def _trainable(model, prefix):
    return sorted(n for n, p in model.named_parameters() if p.requires_grad and n.startswith(prefix))


def _outputs_and_grads(model, x, names):
    params = dict(model.named_parameters())
    x = x.clone().requires_grad_()
    y = model(x)
    y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
    grads = [x.grad] + [params[n].grad.clone() for n in names]
    model.zero_grad(set_to_none=True)
    return y.detach(), grads


def test_each_named_adapter_is_its_peft_kind(models):
    base, ours, theirs = models
    x = torch.randn(5, 16)
    assert set(ours.peft_config) == set(KW)
    for name in KW:
        ours.set_adapter(name)
        mine = _trainable(ours, "model.")
        assert mine and all(f".{name}.weight" in n for n in mine), mine  # only this adapter trains
        peft_names = [n.replace("base_model.model.", "model.").replace(".default.weight", ".default")
                      .replace(".default", f".{name}.weight") for n in _trainable(theirs[name], "base_model.")]
        assert mine == sorted(peft_names)
        y, grads = _outputs_and_grads(ours, x, mine)
        y_p, grads_p = _outputs_and_grads(theirs[name], x, _trainable(theirs[name], "base_model."))
        close(y, y_p, f"{name}: y")
        by_name = dict(zip(peft_names, grads_p[1:]))
        close(grads[0], grads_p[0], f"{name}: dx")
        for n, g in zip(mine, grads[1:]):
            close(g, by_name[n], n)
        with torch.no_grad():
            assert (y - base(x)).abs().max() > 1e-3, name
            with ours.disable_adapter():
                close(ours(x), base(x), f"{name}: disabled")


def test_merge_unmerge_per_name(models):
    base, ours, theirs = models
    x = torch.randn(5, 16)
    weights = {n: m.weight.detach().clone() for n, m in base.named_children()}
    for name, (_, _, kw) in KW.items():
        ours.set_adapter(name)
        with torch.no_grad():
            ours.merge_adapter()
            merged_p = copy.deepcopy(theirs[name]).merge_and_unload()
            for module in weights:
                close(ours.model.get_submodule(module).weight, merged_p.get_submodule(module).weight,
                      f"{name}: {module} merged")
                close(ours.model.get_submodule(module).bias, merged_p.get_submodule(module).bias,
                      f"{name}: {module} merged bias")
            close(ours(x), theirs[name](x), f"{name}: merged y")
            ours.unmerge_adapter()
            for module, w in weights.items():
                assert torch.equal(ours.model.get_submodule(module).weight, w), (name, module)


def test_delete_merge_and_unload_and_unload(models):
    base, ours, theirs = models
    x = torch.randn(5, 16)
    with torch.no_grad():
        ours.delete_adapter("lokr")
        assert set(ours.peft_config) == {"loha", "ia3", "lora"}
        assert not ours.model.get_submodule(V).has_adapter("lokr")
        assert not any(".lokr." in n for n, _ in ours.named_parameters())
        for name in ("loha", "ia3", "lora"):
            ours.set_adapter(name)
            close(ours(x), theirs[name](x), f"{name} after deleting lokr")
        kept = copy.deepcopy(ours)
        plain = ours.merge_and_unload(adapter_names=["loha"])
        merged_p = theirs["loha"].merge_and_unload()
        assert not any(hasattr(m, "kinds") for m in plain.modules())
        for module in (Q, V, DOWN):
            close(plain.get_submodule(module).weight, merged_p.get_submodule(module).weight, f"loha: {module}")
        close(plain(x), merged_p(x), "merge_and_unload")
        unloaded = kept.unload()
        assert not any(hasattr(m, "kinds") for m in unloaded.modules())
        for module in (Q, V, DOWN):
            assert torch.equal(unloaded.get_submodule(module).weight, base.get_submodule(module).weight), module
        assert torch.equal(unloaded(x), base(x))
