"""Per-expert LoRA on routed experts in PEFT's `target_parameters` layout (offline, pure).

transformers 5 holds a MoE layer's routed experts as two fused 3-D parameters, `mlp.experts.
gate_up_proj` [E, 2 ffn, H] (rows [gate; up], as Megatron's linear_fc1) and `mlp.experts.down_proj`
[E, H, ffn]; PEFT adapts them with `target_parameters` through `lora.ParamWrapper`, whose factors
are PER EXPERT: lora_A.weight [E r, in] holds expert e's A in rows e r .. e r + r (expert-major),
lora_B.weight [out, r E] holds expert e's B in columns k E + e (expert-minor), and the delta of
expert e is scaling * B_e @ A_e.  So per-expert adapters are representable exactly when every
expert of the parameter has one, of one rank and alpha (PEFT keeps one r and scaling per
parameter), without dropout or DoRA (ParamWrapper refuses both).

PEFT nests the wrappers in `target_parameters` order: with both parameters targeted
(["experts.gate_up_proj", "experts.down_proj"]), gate_up_proj's factors are saved under
`mlp.experts.base_layer.lora_*` and down_proj's under `mlp.experts.lora_*`; with one, under
`mlp.experts.lora_*`.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch

from parallel_adapters.adapters.pretrained import PEFT_PREFIX

FUSED = {"linear_fc1": "gate_up_proj", "linear_fc2": "down_proj"}
"""Megatron expert linear -> the transformers 5 fused parameter it becomes."""
_EXPERT_KEY = re.compile(r"^decoder\.layers\.(?P<layer>\d+)\.mlp\.experts\.local_experts\.(?P<expert>\d+)\."
                         r"(?P<linear>linear_fc[12])\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


def is_expert_adapter_key(key: str) -> bool:
    return _EXPERT_KEY.match(key) is not None


def pack_expert_factors(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert e's (A_e [r, in], B_e [out, r]) -> PEFT's (lora_A [E r, in], lora_B [out, r E])."""
    return torch.cat(a, dim=0), torch.stack(b, dim=-1).flatten(1)


def unpack_expert_factors(lora_a: torch.Tensor, lora_b: torch.Tensor, num_experts: int) -> list[tuple]:
    """The inverse of pack_expert_factors: [(A_e, B_e)] per expert."""
    a = lora_a.reshape(num_experts, -1, lora_a.shape[-1])
    b = lora_b.reshape(lora_b.shape[0], -1, num_experts)
    return [(a[e], b[:, :, e]) for e in range(num_experts)]


def peft_expert_tensors(tensors: Mapping[str, torch.Tensor], num_experts: int,
                        num_layers: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(PEFT adapter_model entries, target_parameters) for the routed-expert LoRA tensors among
    `tensors` (full tensors under Megatron names; other keys are ignored).  ValueError naming the
    module when the adapters cannot be PEFT's: an expert of a targeted layer without one, experts
    of one parameter with different ranks, or some layers' experts targeted and others not."""
    found: dict[tuple[int, str], dict[int, dict[str, torch.Tensor]]] = {}
    for key, tensor in tensors.items():
        m = _EXPERT_KEY.match(key)
        if m is not None:
            slot = found.setdefault((int(m["layer"]), m["linear"]), {}).setdefault(int(m["expert"]), {})
            slot[m["ab"]] = tensor
    linears = sorted({linear for _, linear in found})
    out: dict[str, torch.Tensor] = {}
    for linear in linears:
        layers = sorted(layer for layer, lin in found if lin == linear)
        if layers != list(range(num_layers)):
            raise ValueError(f"mlp.experts.{FUSED[linear]}: PEFT's target_parameters adapts it in every MoE layer; "
                             f"the adapters cover layers {layers} of {num_layers} (target every layer's experts)")
        for layer in layers:
            experts = found[(layer, linear)]
            module = f"decoder.layers.{layer}.mlp.experts.local_experts.*.{linear}"
            missing = sorted(set(range(num_experts)) - set(experts))
            if missing:
                raise ValueError(f"{module}: experts {missing} have no adapter; PEFT's target_parameters LoRA adapts "
                                 "every expert of the fused parameter (target all experts, or none)")
            a = [experts[e]["A"] for e in range(num_experts)]
            b = [experts[e]["B"] for e in range(num_experts)]
            if len({t.shape[0] for t in a}) > 1:
                raise ValueError(f"{module}: the experts' ranks {sorted({t.shape[0] for t in a})} differ; PEFT keeps "
                                 "one rank per fused parameter")
            lora_a, lora_b = pack_expert_factors(a, b)
            wrapper = "base_layer." if linear == "linear_fc1" and len(linears) == 2 else ""
            base = f"{PEFT_PREFIX}model.layers.{layer}.mlp.experts.{wrapper}"
            out[base + "lora_A.weight"], out[base + "lora_B.weight"] = lora_a, lora_b
    return out, [f"experts.{FUSED[linear]}" for linear in linears]
