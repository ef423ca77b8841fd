"""PEFT export and offline merge of adapters beyond LoRA on the four linears: DoRA (PEFT's
`lora_magnitude_vector`, split with B's rows into q/k/v and gate/up) and LoRA on the word embedding
and the output layer (PEFT's `lora_embedding_A/B` on embed_tokens, `lora_A/B` on lm_head), on a
Llama and a Qwen2 whose vocabulary (101) does not divide by TP=2, untied and tied.

Oracle: PEFT + transformers loading the export onto the same HF model reproduce the Megatron
adapted logits (fp32, 1e-4) with no key left unloaded; the merged checkpoint reproduces them in
plain transformers; a tied base refuses the merge, naming why.
"""
import json
import warnings

import pytest
import torch

from parallel_adapters.checkpoint.export import export_peft_from_checkpoint
from parallel_adapters.checkpoint.layout import CheckpointError
from parallel_adapters.checkpoint.merge import merge_into_hf
from tests.helpers.tiny_llama import hf_logits, make_tiny_llama, make_tiny_qwen2, sample_ids
from tests.mcore import hf_jobs

IDS = sample_ids()
EMBEDDING_TARGETS = ["linear_qkv", "linear_fc2", "word_embeddings", "output_layer"]
LINEAR_TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
CASES = {  # name: (HF model maker, targets, LoraConfig fields)
    "llama_dora": (make_tiny_llama, LINEAR_TARGETS, {"use_dora": True, "rank_pattern": {"layers.1.mlp.linear_fc1": 2}}),
    "qwen2_dora": (make_tiny_qwen2, LINEAR_TARGETS, {"use_dora": True}),
    "qwen2_dora_embeddings": (make_tiny_qwen2, LINEAR_TARGETS + EMBEDDING_TARGETS[2:], {"use_dora": True}),
    "llama_embeddings": (make_tiny_llama, EMBEDDING_TARGETS, {}),
    "llama_tied_embeddings": (lambda d: make_tiny_llama(d, tie=True), EMBEDDING_TARGETS, {}),
    "qwen2_embeddings": (make_tiny_qwen2, EMBEDDING_TARGETS, {"rank_pattern": {"output_layer": 2}}),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory, pool2):
    make, targets, fields = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    hf_dir = make(root / "hf")
    results = pool2.run(hf_jobs.adapter_export_job, str(hf_dir), str(root / "ckpt"), IDS, targets, fields)
    peft_dir = export_peft_from_checkpoint(root / "ckpt", root / "peft", hf_dir)
    return {"name": request.param, "hf": hf_dir, "root": root, "peft": peft_dir, **results[0]}


def test_peft_reproduces_the_megatron_logits(case):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert (case["adapted"] - case["base"]).abs().max() > 1e-3, "the adapter must change the logits"
    model = AutoModelForCausalLM.from_pretrained(case["hf"], dtype=torch.float32).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(model, case["peft"]).eval()
    assert not [w for w in caught if "adapter keys" in str(w.message)], [str(w.message) for w in caught]
    state = peft_model.state_dict()
    config = json.loads((case["peft"] / "adapter_config.json").read_text())
    if "dora" in case["name"]:
        assert config["use_dora"] is True
        magnitudes = [k for k in state if k.endswith("lora_magnitude_vector.default.weight")]
        assert len(magnitudes) == 2 * 7 + 2 * ("embeddings" in case["name"])  # q/k/v and gate/up split
    if "embeddings" in case["name"]:
        assert state["base_model.model.model.embed_tokens.lora_embedding_A.default"].shape[1] == 101  # no padding
        assert state["base_model.model.lm_head.lora_B.default.weight"].shape[0] == 101
        assert {"embed_tokens", "lm_head"} <= set(config["target_modules"])
    with torch.no_grad():
        logits = peft_model(input_ids=IDS).logits.float()
    torch.testing.assert_close(logits, case["adapted"], atol=1e-4, rtol=0)


def test_merge_reproduces_the_logits_or_refuses_a_tied_base(case):
    out = case["root"] / "merged"
    if "tied" in case["name"]:
        with pytest.raises(CheckpointError, match="ties lm_head to embed_tokens"):
            merge_into_hf(case["peft"], case["hf"], out, progress=False)
        assert not out.exists()
        return
    for source in (case["root"] / "ckpt", case["peft"]):
        merged = merge_into_hf(source, case["hf"], out, progress=False, overwrite=True)
        torch.testing.assert_close(hf_logits(merged, IDS), case["adapted"], atol=1e-4, rtol=0)
