"""Prompt tuning saved, reloaded across layouts and exported in PEFT's PROMPT_TUNING format.

A tiny HF Llama imported into Megatron at TP=2 with sequence parallelism, a prompt adapter with
given values: save_checkpoint / load_checkpoint bring the prompt back (same layout and TP=1 PP=2);
export_peft_from_checkpoint writes PEFT's files, and PEFT's own PeftModel.from_pretrained on the
transformers model reproduces the Megatron logits (fp32, 1e-4) with the prompt under PEFT's key.
The offline merge refuses a prompt adapter, from the checkpoint and from the export, saying why.
"""
import json
import warnings

import pytest
import torch

from parallel_adapters.checkpoint.export import export_peft, export_peft_from_checkpoint
from parallel_adapters.checkpoint.layout import CheckpointError
from parallel_adapters.checkpoint.merge import merge_into_hf
from tests.helpers.tiny_llama import make_tiny_llama, sample_ids
from tests.mcore import prompt_jobs
from tests.mcore.prompt_jobs import N_VIRTUAL

IDS = sample_ids(batch=2, seq=12)
VALUES = torch.randn(N_VIRTUAL, 48, generator=torch.Generator().manual_seed(5)) * 0.5


@pytest.fixture(scope="module")
def saved(pool2, tmp_path_factory):
    root = tmp_path_factory.mktemp("prompt_export")
    hf_dir = make_tiny_llama(root / "hf")
    results = pool2.run(prompt_jobs.save_job, str(hf_dir), 2, 1, True, str(root / "ckpt"), IDS, VALUES)
    return {"root": root, "hf": hf_dir, "ckpt": root / "ckpt", "results": results}


def test_checkpoint_round_trip_same_layout_and_resharded(pool2, saved):
    for r in saved["results"]:
        torch.testing.assert_close(r["prompt"], VALUES, atol=0, rtol=0)
        torch.testing.assert_close(r["reloaded"], r["logits"], atol=0, rtol=0)
    config = json.loads((saved["ckpt"] / "adapter_config.json").read_text())
    assert config["adapter_kind"] == "prompt_tuning" and config["num_virtual_tokens"] == N_VIRTUAL
    loaded = pool2.run(prompt_jobs.load_job, str(saved["hf"]), 1, 2, False, str(saved["ckpt"]), IDS)
    assert torch.equal(loaded[0]["prompt"], VALUES) and loaded[1]["prompt"] is None  # first stage only
    torch.testing.assert_close(loaded[1]["logits"], saved["results"][0]["logits"], atol=1e-5, rtol=1e-5)


def test_peft_loads_the_export_and_reproduces_the_megatron_logits(saved):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = export_peft_from_checkpoint(saved["ckpt"], saved["root"] / "peft", saved["hf"])
    config = json.loads((out / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "task_type", "num_virtual_tokens", "token_dim",
                                   "num_transformer_submodules", "num_attention_heads", "num_layers")} == {
        "peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": N_VIRTUAL, "token_dim": 48,
        "num_transformer_submodules": 1, "num_attention_heads": 4, "num_layers": 2}
    assert config["base_model_name_or_path"] == str(saved["hf"])
    assert list(load_file(str(out / "adapter_model.safetensors"))) == ["prompt_embeddings"]
    model = AutoModelForCausalLM.from_pretrained(saved["hf"], dtype=torch.float32).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(model, out).eval()
    assert not [w for w in caught if "adapter keys" in str(w.message)], [str(w.message) for w in caught]
    torch.testing.assert_close(peft_model.prompt_encoder["default"].embedding.weight.detach(), VALUES)
    with torch.no_grad():
        logits = peft_model(input_ids=IDS).logits.float()
        base = model(input_ids=IDS).logits.float()
    megatron = saved["results"][0]["logits"]
    assert (logits[:, N_VIRTUAL:] - base).abs().max() > 1e-3, "the prompt must change the logits"
    torch.testing.assert_close(logits, megatron, atol=1e-4, rtol=0)


def test_export_from_tensors_and_refusals(saved, tmp_path):
    tensors = {"prompt_tuning.prompt_embeddings.default.weight": VALUES}
    config = {"adapter_kind": "prompt_tuning", "num_virtual_tokens": N_VIRTUAL, "prompt_tuning_init": "TEXT",
              "init_token_ids": [3, 4]}  # TEXT without a tokenizer: PEFT could not load it, so RANDOM is written
    out = export_peft(tensors, tmp_path / "peft", saved["hf"], config, dtype=torch.bfloat16)
    written = json.loads((out / "adapter_config.json").read_text())
    assert written["prompt_tuning_init"] == "RANDOM" and "init_token_ids" not in written
    with pytest.raises(ValueError, match="num_virtual_tokens=4, the prompt has 5 rows"):
        export_peft(tensors, tmp_path / "bad", saved["hf"], {**config, "num_virtual_tokens": 4})
    with pytest.raises(ValueError, match="pass adapter_name"):
        export_peft({**tensors, "prompt_tuning.prompt_embeddings.other.weight": VALUES}, tmp_path / "bad",
                    saved["hf"], config)
    for source in (saved["ckpt"], out):
        with pytest.raises(CheckpointError, match="cannot merge a prompt-tuning adapter.*changes no weight"):
            merge_into_hf(source, saved["hf"], tmp_path / "merged", progress=False)
        assert not (tmp_path / "merged").exists()


def test_save_pretrained_and_from_pretrained_speak_peft(pool2, saved, tmp_path):
    from peft import PeftModel
    from peft import PromptTuningConfig as PeftPromptTuningConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    other = VALUES.flip(0) * 0.7
    hf = AutoModelForCausalLM.from_pretrained(saved["hf"], dtype=torch.float32).eval()
    written = get_peft_model(hf, PeftPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL))
    with torch.no_grad():
        written.prompt_encoder["default"].embedding.weight.copy_(other)
        expected = written(input_ids=IDS).logits.float()
    written.save_pretrained(tmp_path / "by_peft")
    results = pool2.run(prompt_jobs.pretrained_job, str(saved["hf"]), str(tmp_path / "ours"),
                        str(tmp_path / "by_peft"), IDS, VALUES)
    for r in results:
        torch.testing.assert_close(r["loaded"], expected, atol=1e-5, rtol=1e-5)  # PEFT's files into Megatron
        assert r["trainable"] == 0
        fresh = AutoModelForCausalLM.from_pretrained(saved["hf"], dtype=torch.float32).eval()
        peft_model = PeftModel.from_pretrained(fresh, r["dir"]).eval()  # ours into PEFT
        with torch.no_grad():
            torch.testing.assert_close(peft_model(input_ids=IDS).logits.float(), r["saved"], atol=1e-5, rtol=1e-5)
