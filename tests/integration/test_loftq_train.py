"""LoftQ through `train` (TP=2 + SP, NF4, loftq_iter=1): the checkpoint carries the factors that
rebuild the de-quantised base Q (zeros at loftq_iter=1: Q = dequant(quant(W))), resume rebuilds Q
from the original base and continues bit-exactly, the export writes the adapter for Q (with a
warning; --convert-to-lora refused, naming why), and merge folds it into Q.

Oracles: the uninterrupted run (losses and every rank's shards, bit-exact; a resume onto the
original, unquantised base would change the losses); PEFT + transformers with the exported adapter
on a de-quantised HF base built here by the dense NF4 reference (tests/unit/decompose) reproduce
the merged model's logits (1e-4).
"""
import json

import pytest
import torch
from safetensors import safe_open

from parallel_adapters.checkpoint.export import export_peft_from_checkpoint
from parallel_adapters.checkpoint.merge import merge_into_hf
from parallel_adapters.checkpoint.reader import CheckpointReader
from parallel_adapters.user_errors import UserError
from tests.helpers.tiny_llama import hf_logits, make_tiny_llama, sample_ids
from tests.integration.train_jobs import train_job
from tests.unit.decompose.test_quantize import dense_reference

SHAPE = dict(vocab_size=257, hidden_size=128, head_dim=32, intermediate_size=128)  # I / 2 = 64 on row layers
RUN = ["parallel.tensor=2", "parallel.sequence_parallel=true", "optim.steps=4", "data.tokenizer=byte",
       "adapter.r=4", "adapter.lora_alpha=4", "adapter.init_lora_weights=loftq",
       "adapter.loftq_config.loftq_bits=4", "adapter.loftq_config.loftq_iter=1"]
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _dequantized_base(hf, out):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in TARGETS:
                module.weight.copy_(dense_reference(module.weight.detach(), 4, 64, "normal"))
    model.save_pretrained(out)
    return out


def test_train_resume_export_and_merge(pool2, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf = make_tiny_llama(tmp_path / "hf", **SHAPE)
    run = [*RUN, f"model.hf_checkpoint={hf}"]
    saving = [f"checkpoint.directory={tmp_path}/ck", "checkpoint.save_every=2"]
    straight = pool2.run(train_job, run)
    first = pool2.run(train_job, run + saving, None, "auto", 2)
    second = pool2.run(train_job, run + saving + [f"export.peft_dir={tmp_path}/peft"])  # resumes by itself
    assert second[0]["start_step"] == 2
    for a, b, c in zip(straight, first, second):
        assert b["losses"] + c["losses"] == a["losses"]
        assert a["shards"].keys() == c["shards"].keys()
        assert all(torch.equal(a["shards"][n][0], c["shards"][n][0]) for n in a["shards"])

    ckpt = second[0]["last_checkpoint"]
    with CheckpointReader(ckpt) as reader:
        initial = [n for n in reader.tensors if n.endswith(".initial")]
        assert initial and all(not reader.read_full(n).any() for n in initial)  # loftq_iter=1: B_prev A_prev = 0
        assert reader.config()["init_lora_weights"] == "loftq"  # still recorded after the resume
        assert reader.config()["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 1}
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (4, 4, True)
    with pytest.warns(UserWarning, match="LoftQ-de-quantised base"):
        export_peft_from_checkpoint(ckpt, tmp_path / "offline")  # the same adapter, offline
    with safe_open(tmp_path / "offline" / "adapter_model.safetensors", "pt") as f, \
            safe_open(tmp_path / "peft" / "adapter_model.safetensors", "pt") as g:
        assert sorted(f.keys()) == sorted(g.keys()) and not any("initial" in k for k in f.keys())
        assert all(torch.equal(f.get_tensor(k), g.get_tensor(k)) for k in f.keys())
    with pytest.raises(UserError, match="cannot convert a LoftQ adapter.*full rank"):
        export_peft_from_checkpoint(ckpt, tmp_path / "converted", convert_to_lora=True)
    assert not (tmp_path / "converted").exists()

    ids = sample_ids(vocab=257)
    qbase = _dequantized_base(hf, tmp_path / "qbase")
    base = AutoModelForCausalLM.from_pretrained(qbase, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    with torch.no_grad():
        peft_logits = peft_model(input_ids=ids).logits.float()
    assert (peft_logits - hf_logits(qbase, ids)).abs().max() > 1e-3, "the adapter must change the logits"
    assert (hf_logits(qbase, ids) - hf_logits(hf, ids)).abs().max() > 1e-3, "Q must differ from W"
    merged = merge_into_hf(ckpt, None, tmp_path / "merged", progress=False)  # the original base, quantised here
    torch.testing.assert_close(hf_logits(merged, ids), peft_logits, atol=1e-4, rtol=0)
