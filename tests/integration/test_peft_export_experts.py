"""PEFT export and offline merge of LoRA on the routed experts (and attention) of a tiny Qwen3-MoE
imported at EP 2 and at TP 2 x EP 2 (SP on), of a tiny Mixtral at TP 2 x EP 2 and of the MLP of a
tiny dense Qwen3 at TP 2, all but the first after two AdamW steps.

Oracle: PEFT + transformers 5 (the experts as fused 3-D parameters adapted through PEFT's
`target_parameters`) reproduce the Megatron adapted logits within 1e-4, and the merged checkpoint
(per-expert tensors, as saved) reproduces them in plain transformers.  What PEFT's layout cannot
hold is refused naming the module.
"""
import json

import pytest
import torch

from parallel_adapters.checkpoint.export import export_peft_from_checkpoint
from parallel_adapters.checkpoint.layout import CheckpointError
from parallel_adapters.checkpoint.merge import merge_into_hf
from tests.helpers.tiny_llama import hf_logits, make_tiny_mixtral, make_tiny_qwen3, make_tiny_qwen3_moe, sample_ids
from tests.mcore import hf_moe_jobs

IDS = sample_ids()
TARGETS = ["linear_qkv", "linear_fc1", "linear_fc2"]  # fc1/fc2 match the routed experts by suffix
EXPERT_PARAMETERS = ["experts.gate_up_proj", "experts.down_proj"]
CASES = {  # model, pool, tp, ep, AdamW steps before the export
    "qwen3_moe-ep2": (make_tiny_qwen3_moe, "pool2", 1, 2, 0),
    "qwen3_moe-tp2-ep2": (make_tiny_qwen3_moe, "pool4", 2, 2, 2),
    "mixtral-tp2-ep2": (make_tiny_mixtral, "pool4", 2, 2, 2),
    "qwen3-tp2": (make_tiny_qwen3, "pool2", 2, 1, 2),  # dense: gate/up/down_proj, no target_parameters
}


@pytest.mark.parametrize("case", CASES)
def test_expert_lora_exports_to_peft_and_merges(request, tmp_path, case):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    make, pool_name, tp, ep, steps = CASES[case]
    hf = make(tmp_path / "hf")
    results = request.getfixturevalue(pool_name).run(hf_moe_jobs.expert_adapter_job, str(hf), str(tmp_path / "ck"),
                                                     IDS, tp, ep, TARGETS, train_steps=steps)
    base, adapted = results[0]["base"], results[0]["adapted"]
    assert (adapted - base).abs().max() > 1e-3, "the adapter must change the logits"
    peft_dir = export_peft_from_checkpoint(tmp_path / "ck", tmp_path / "peft", hf)
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    moe = ep > 1
    assert config.get("target_parameters") == (EXPERT_PARAMETERS if moe else None)
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj"} | (set() if moe else
                                                                             {"gate_proj", "up_proj", "down_proj"})
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, peft_dir).eval()
    with torch.no_grad():
        logits = peft_model(input_ids=IDS).logits.float()
    torch.testing.assert_close(logits, adapted, atol=1e-4, rtol=0)
    merged = merge_into_hf(tmp_path / "ck", hf, tmp_path / "merged", progress=False)
    torch.testing.assert_close(hf_logits(merged, IDS), adapted, atol=1e-4, rtol=0)
    if moe:
        with pytest.raises(CheckpointError, match="target_parameters"):
            merge_into_hf(peft_dir, hf, tmp_path / "merged2", progress=False)
