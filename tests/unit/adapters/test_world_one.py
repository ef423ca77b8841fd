"""A plain torch module in one process, as under PEFT: no torch.distributed, no Megatron state.

References: the base module itself (the adapter starts as a no-op), the gradients autograd gives
(finalize_grads must leave them alone), and the saved tensors (save_pretrained / from_pretrained
round trip).  The "nothing initialised" process end to end: tests/integration/test_peft_script.py.
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from parallel_adapters import AdapterModel, LoraConfig, ParallelGroups, get_adapter_model
from parallel_adapters.adapters import model as model_module
from parallel_adapters.mcore.compat import ColumnParallelLinear


@pytest.fixture
def no_megatron_state(monkeypatch):
    monkeypatch.setattr(model_module, "is_parallel_state_initialized", lambda: False)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))


def test_plain_module_gets_one_process_and_finalize_grads_is_a_no_op(no_megatron_state):
    base = _mlp()
    x = torch.randn(4, 6)
    expected = base(x).detach()
    model = get_adapter_model(base, LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False))
    assert model.groups == ParallelGroups.single()
    with torch.no_grad():
        model.disable_adapter_layers()
        torch.testing.assert_close(model(x), expected, atol=0, rtol=0)
        model.enable_adapter_layers()
    model(x).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert len(grads) == 4 and all(g.abs().sum() > 0 for g in grads.values())
    model.finalize_grads(data_parallel=True)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], atol=0, rtol=0)


def test_megatron_layer_without_parallel_state_is_a_clear_error(no_megatron_state):
    layer = ColumnParallelLinear.__new__(ColumnParallelLinear)  # a Megatron layer, no parallel state needed
    nn.Module.__init__(layer)
    with pytest.raises(ValueError, match=r"blocks\.1 \(ColumnParallelLinear\).*not initialised"):
        get_adapter_model(nn.ModuleDict({"blocks": nn.Sequential(nn.Linear(2, 2), layer)}), LoraConfig(r=1))


def test_save_pretrained_round_trip_with_two_adapters(tmp_path, no_megatron_state):
    model = get_adapter_model(_mlp(), LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"],
                                                 init_lora_weights=False, seed=1))
    model.add_adapter("other", LoraConfig(r=1, target_modules=["2"], init_lora_weights=False, seed=2))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2 and "seed" not in config
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()
    x = torch.randn(4, 6)
    for name in ("default", "other"):
        model.set_adapter(name)
        loaded = AdapterModel.from_pretrained(_mlp(), tmp_path, adapter_name=name)
        assert not any(p.requires_grad for p in loaded.parameters())
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    trainable = AdapterModel.from_pretrained(_mlp(), tmp_path, is_trainable=True)
    assert sum(p.requires_grad for p in trainable.parameters()) == 4


def test_save_pretrained_refuses_what_it_does_not_carry(tmp_path, no_megatron_state):
    model = get_adapter_model(_mlp(), LoraConfig(r=2, target_modules=["0"], bias="all"))
    with pytest.raises(ValueError, match="not trained biases or modules_to_save"):
        model.save_pretrained(tmp_path)
    sharded = get_adapter_model(_mlp(), LoraConfig(r=2, target_modules=["0"]),
                                groups=ParallelGroups(tp_size=2, tp_rank=0))
    with pytest.raises(ValueError, match="TP=2"):
        sharded.save_pretrained(tmp_path)
