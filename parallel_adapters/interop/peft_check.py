"""Load an exported adapter with PEFT onto its Hugging Face base and compare logits."""
from __future__ import annotations

from pathlib import Path

import torch


def peft_logits(hf_dir: str | Path, peft_dir: str | Path, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits [B, S, vocab] of `PeftModel.from_pretrained(LlamaForCausalLM(hf_dir), peft_dir)`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(peft_dir)).eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


def verify_peft_reproduces(hf_dir: str | Path, peft_dir: str | Path, input_ids: torch.Tensor,
                           megatron_logits: torch.Tensor, atol: float = 1e-4) -> float:
    """Max |PEFT logits - Megatron logits|; ValueError naming both if it exceeds `atol`."""
    diff = (peft_logits(hf_dir, peft_dir, input_ids) - megatron_logits.float()).abs().max().item()
    if diff > atol:
        raise ValueError(f"PEFT ({peft_dir} on {hf_dir}) differs from the Megatron logits by {diff:.3g} > {atol}")
    return diff
