"""PiSSA / OLoRA / CorDA through `train` (TP=2 + SP, 5 steps): the checkpoint carries the initial
factors A0, B0, resume rebuilds the residual base W - s B0 A0 from them, and the export converts the
adapter to a rank-2r LoRA on the ORIGINAL base (PEFT's path_initial_model_for_weight_conversion).

Oracles: the uninterrupted run (losses and every rank's shards, bit-exact; a resume onto the
original base would change the losses); PEFT + transformers on the original HF base reproduce the
Megatron logits (the run's export.verify_with_peft, 1e-4); the offline merge reproduces PEFT's
logits in plain transformers (1e-4).
"""
import json

import pytest
import torch

from parallel_adapters.checkpoint.export import export_peft_from_checkpoint
from parallel_adapters.checkpoint.merge import merge_into_hf
from parallel_adapters.checkpoint.reader import CheckpointReader
from parallel_adapters.user_errors import UserError
from tests.helpers.tiny_llama import hf_logits, make_tiny_llama, sample_ids
from tests.integration.test_cli_offline import _cli
from tests.integration.train_jobs import train_job

RUN = ["parallel.tensor=2", "parallel.sequence_parallel=true", "optim.steps=5", "data.tokenizer=byte",
       "adapter.r=4", "adapter.lora_alpha=8"]


@pytest.mark.parametrize("init", ["pissa", "olora", "corda"])
def test_train_resume_convert_export_and_merge(pool2, tmp_path, init):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf = make_tiny_llama(tmp_path / "hf", vocab_size=257)
    run = [*RUN, f"model.hf_checkpoint={hf}", f"adapter.init_lora_weights={init}"]
    if init == "corda":  # covariance from two calibration micro-batches of the run's data
        run += ["adapter.corda_config.calibration_batches=2", "adapter.corda_config.corda_method=kpm"]
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
    assert second[0]["peft_max_logit_diff"] is not None and second[0]["peft_max_logit_diff"] <= 1e-4

    ckpt = second[0]["last_checkpoint"]
    with CheckpointReader(ckpt) as reader:
        assert any(n.endswith(".initial") for n in reader.tensors)
        assert reader.config()["init_lora_weights"] == init  # still recorded after the resume
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16, True)
    with pytest.raises(UserError, match="residual base.*--convert-to-lora"):
        export_peft_from_checkpoint(ckpt, tmp_path / "plain")
    assert not (tmp_path / "plain").exists()
    refused = _cli("export", ckpt, "--out", str(tmp_path / "plain"), check=False)
    assert refused.returncode != 0 and "--convert-to-lora" in refused.stderr
    _cli("export", ckpt, "--out", str(tmp_path / "peft2"), "--convert-to-lora")  # the recorded base, offline

    ids = sample_ids(vocab=257)
    base = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "peft2").eval()
    with torch.no_grad():
        peft_logits = peft_model(input_ids=ids).logits.float()
    assert (peft_logits - hf_logits(hf, ids)).abs().max() > 1e-3, "the adapter must change the logits"
    merged = merge_into_hf(ckpt, None, tmp_path / "merged", progress=False)  # no flag: always the original base
    torch.testing.assert_close(hf_logits(merged, ids), peft_logits, atol=1e-4, rtol=0)
