"""`train` -> sharded checkpoint -> bit-exact resume -> PEFT export -> PEFT + transformers, and the
offline merge, for DoRA and for LoRA on the embedding and the output layer, on a Llama and a Qwen2
(TP=2 with sequence parallelism; the byte tokenizer's 257 ids do not divide by TP, so the tables
carry a padding row).

Oracles: the uninterrupted run (losses and every rank's shards, bit-exact); PEFT + transformers on
the HF base reproduce the Megatron logits (the run's own export.verify_with_peft, 1e-4); the merged
checkpoint reproduces PEFT's logits in plain transformers (1e-4).
"""
import pytest
import torch

from parallel_adapters.checkpoint.merge import merge_into_hf
from tests.helpers.tiny_llama import hf_logits, make_tiny_llama, make_tiny_qwen2, sample_ids
from tests.integration.train_jobs import train_job

RUN = ["parallel.tensor=2", "parallel.sequence_parallel=true", "optim.steps=4", "data.tokenizer=byte"]
CASES = {  # name: (HF model maker, adapter overrides)
    "llama_dora": (make_tiny_llama, ["adapter.use_dora=true"]),
    "qwen2_dora": (make_tiny_qwen2, ["adapter.use_dora=true"]),
    "llama_embeddings": (make_tiny_llama, ["adapter.target_modules=[linear_qkv,word_embeddings,output_layer]"]),
    "qwen2_embeddings": (make_tiny_qwen2, ["adapter.target_modules=[linear_proj,word_embeddings,output_layer]"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_train_resume_export_and_merge(pool2, tmp_path, name):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    make, adapter = CASES[name]
    hf = make(tmp_path / "hf", vocab_size=257)
    run = [*RUN, f"model.hf_checkpoint={hf}", *adapter]
    saving = [f"checkpoint.directory={tmp_path}/ck", "checkpoint.save_every=2"]
    export = [f"export.peft_dir={tmp_path}/peft", "export.verify_with_peft=true"]
    straight = pool2.run(train_job, run)
    first = pool2.run(train_job, run + saving, None, "auto", 2)
    second = pool2.run(train_job, run + saving + export)  # resumes from `latest` by itself
    assert second[0]["start_step"] == 2
    for a, b, c in zip(straight, first, second):
        assert b["losses"] + c["losses"] == a["losses"]
        assert a["shards"].keys() == c["shards"].keys()
        assert all(torch.equal(a["shards"][n][0], c["shards"][n][0]) for n in a["shards"])
    kind_tensor = "lora_magnitude_vector" if "dora" in name else "lora_embedding_A"
    assert any(kind_tensor in n for n in straight[0]["shards"])
    assert second[0]["peft_max_logit_diff"] is not None and second[0]["peft_max_logit_diff"] <= 1e-4

    ids = sample_ids(vocab=257)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32),
                                           tmp_path / "peft").eval()
    with torch.no_grad():
        peft_logits = peft_model(input_ids=ids).logits.float()
    assert (peft_logits - hf_logits(hf, ids)).abs().max() > 1e-3, "the adapter must change the logits"
    merged = merge_into_hf(second[0]["last_checkpoint"], None, tmp_path / "merged", progress=False)  # recorded base
    torch.testing.assert_close(hf_logits(merged, ids), peft_logits, atol=1e-4, rtol=0)
