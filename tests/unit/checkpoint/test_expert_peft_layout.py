"""Per-expert LoRA on routed experts -> PEFT's target_parameters layout (checkpoint/expert_adapter.py).

Oracle: transformers 5's Qwen3-MoE built in memory (fused experts.gate_up_proj [E, 2 ffn, H],
experts.down_proj [E, H, ffn]) with each expert's delta scaling * B_e @ A_e added to its slice by
hand, float64; PEFT (ParamWrapper, target_parameters) loading the packed tensors must give the same
logits, and its own state dict must have exactly the keys and shapes written."""
from __future__ import annotations

import copy

import pytest
import torch

from parallel_adapters.checkpoint.expert_adapter import (pack_expert_factors, peft_expert_tensors,
                                                         unpack_expert_factors)

E, LAYERS, R, ALPHA, H, FFN = 4, 2, 2, 4, 16, 8


def _model():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=64, hidden_size=H, intermediate_size=32, moe_intermediate_size=FFN,
                            num_hidden_layers=LAYERS, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                            num_experts=E, num_experts_per_tok=2)
    config._experts_implementation = "eager"  # the per-expert loop (grouped_mm has no float64)
    return Qwen3MoeForCausalLM(config).double().eval()


def _megatron_tensors(linears=("linear_fc1", "linear_fc2")) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    dims = {"linear_fc1": (2 * FFN, H), "linear_fc2": (H, FFN)}
    out = {}
    for layer in range(LAYERS):
        for e in range(E):
            for linear in linears:
                rows, cols = dims[linear]
                base = f"decoder.layers.{layer}.mlp.experts.local_experts.{e}.{linear}"
                out[f"{base}.lora_A.weight"] = torch.randn(R, cols, generator=g, dtype=torch.float64)
                out[f"{base}.lora_B.weight"] = torch.randn(rows, R, generator=g, dtype=torch.float64)
    return out


def _merged_by_hand(model, tensors):
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for layer in range(LAYERS):
            experts = merged.model.layers[layer].mlp.experts
            for e in range(E):
                for linear, param in (("linear_fc1", experts.gate_up_proj), ("linear_fc2", experts.down_proj)):
                    base = f"decoder.layers.{layer}.mlp.experts.local_experts.{e}.{linear}"
                    if f"{base}.lora_A.weight" in tensors:
                        param[e] += ALPHA / R * tensors[f"{base}.lora_B.weight"] @ tensors[f"{base}.lora_A.weight"]
    return merged


@pytest.mark.parametrize("linears", [("linear_fc1", "linear_fc2"), ("linear_fc1",), ("linear_fc2",)])
def test_peft_reproduces_per_expert_lora(linears):
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    tensors = _megatron_tensors(linears)
    packed, target_parameters = peft_expert_tensors(tensors, E, LAYERS)
    model = _model()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    want = _merged_by_hand(model, tensors)(ids).logits
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=[],
                                                                 target_parameters=target_parameters))
    own = get_peft_model_state_dict(peft_model)
    assert {k: tuple(v.shape) for k, v in own.items()} == {k: tuple(v.shape) for k, v in packed.items()}
    result = set_peft_model_state_dict(peft_model, packed)
    assert not result.unexpected_keys
    got = peft_model(ids).logits
    assert (want - model(ids).logits).abs().max() > 1e-2  # the adapters do change the logits
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_pack_and_unpack_are_inverse_and_expert_minor_in_b():
    a = [torch.full((R, 3), float(e)) for e in range(E)]
    b = [torch.full((5, R), float(e)) for e in range(E)]
    lora_a, lora_b = pack_expert_factors(a, b)
    assert lora_a.shape == (E * R, 3) and lora_b.shape == (5, R * E)
    assert lora_b[0].tolist() == [0.0, 1.0, 2.0, 3.0] * R  # column k E + e is expert e's
    for e, (ae, be) in enumerate(unpack_expert_factors(lora_a, lora_b, E)):
        assert torch.equal(ae, a[e]) and torch.equal(be, b[e])


def test_what_peft_cannot_hold_is_refused_naming_the_module():
    tensors = _megatron_tensors()
    partial = {k: v for k, v in tensors.items() if ".local_experts.3." not in k}
    with pytest.raises(ValueError, match=r"local_experts\.\*\.linear_fc1: experts \[3\] have no adapter"):
        peft_expert_tensors(partial, E, LAYERS)
    one_layer = {k: v for k, v in tensors.items() if k.startswith("decoder.layers.0.")}
    with pytest.raises(ValueError, match=r"gate_up_proj: .* every MoE layer; .* layers \[0\] of 2"):
        peft_expert_tensors(one_layer, E, LAYERS)
    ranks = dict(tensors)
    key = "decoder.layers.1.mlp.experts.local_experts.2.linear_fc2"
    ranks[f"{key}.lora_A.weight"], ranks[f"{key}.lora_B.weight"] = torch.zeros(3, FFN), torch.zeros(H, 3)
    with pytest.raises(ValueError, match=r"layers\.1\.mlp.* ranks \[2, 3\] differ"):
        peft_expert_tensors(ranks, E, LAYERS)
