"""Greedy text generation with transformers, from a Hugging Face base and from the same base with an
exported PEFT adapter (the demo's before / after sample)."""
from __future__ import annotations

from pathlib import Path

import torch


def greedy_continuations(hf_dir: str | Path, peft_dir: str | Path, prompt: str,
                         max_new_tokens: int = 20) -> tuple[str, str]:
    """(base, adapted): the greedy continuation of `prompt` (special tokens dropped) by the model in
    `hf_dir` and by `PeftModel.from_pretrained(that model, peft_dir)`, float32."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    base = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids

    def generate(model: torch.nn.Module) -> str:
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                 max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                                 top_k=None, pad_token_id=tokenizer.eos_token_id)
        return tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)

    before = generate(base)
    after = generate(PeftModel.from_pretrained(base, str(peft_dir)).eval())
    return before, after
