"""Prefix tuning saved, reloaded across layouts and exported in PEFT's PREFIX_TUNING format.

A tiny GQA HF Llama imported into Megatron with a prefix adapter set to given values: the
per-layer table saved at TP=2 with sequence parallelism (sharded by KV group) and reloaded there,
at TP=1 (resharded 2 -> 1) and PP=2; PEFT's prefix_projection encoder saved at PP=2 (stage 0 writes
it, stage 1 loads its replica) and reloaded at TP=2.  export_peft_from_checkpoint writes PEFT's
files, and PEFT's own PeftModel.from_pretrained on the transformers model reproduces the Megatron
logits (fp32, 1e-4).  Merging refuses a prefix adapter (model, checkpoint, export), saying why.
save_pretrained / from_pretrained exchange directories with PEFT's own, both ways.
"""
import json

import pytest
import torch

from parallel_adapters.checkpoint.export import export_peft_from_checkpoint
from parallel_adapters.checkpoint.layout import CheckpointError
from parallel_adapters.checkpoint.merge import merge_into_hf
from tests.helpers.tiny_llama import make_tiny_llama, sample_ids
from tests.mcore import prefix_jobs
from tests.mcore.prefix_jobs import N_PREFIX

IDS = sample_ids(batch=2, seq=12)
TABLE = torch.randn(N_PREFIX, 2 * 2 * 24, generator=torch.Generator().manual_seed(5)) * 0.5
PROJECTION = {"prefix_projection": True, "encoder_hidden_size": 16}


def _encoder_state() -> dict:
    g = torch.Generator().manual_seed(6)
    shapes = {"embedding.weight": (N_PREFIX, 24), "transform.0.weight": (16, 24), "transform.0.bias": (16,),
              "transform.2.weight": (96, 16), "transform.2.bias": (96,)}
    return {k: torch.randn(s, generator=g) * 0.5 for k, s in shapes.items()}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("hf") / "tiny")


@pytest.mark.parametrize("variant", ["table", "projection"])
def test_checkpoint_reshards_and_peft_loads_the_export(pool2, hf_dir, tmp_path, variant):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    fields, state, saved_at, loads = (({}, {"prompt_embeddings": TABLE}, (2, 1, True), [(1, 1, False), (1, 2, False)])
                                      if variant == "table" else
                                      (PROJECTION, _encoder_state(), (1, 2, False), [(2, 1, False)]))
    ckpt = tmp_path / "ckpt"
    saved = pool2.run(prefix_jobs.save_job, str(hf_dir), *saved_at, str(ckpt), IDS, fields, state)
    logits = [r["logits"] for r in saved if r["logits"] is not None][0]
    for r in saved:
        if r["logits"] is not None:
            torch.testing.assert_close(r["reloaded"], r["logits"], atol=0, rtol=0)
    config = json.loads((ckpt / "adapter_config.json").read_text())
    assert config["adapter_kind"] == "prefix_tuning" and config["num_virtual_tokens"] == N_PREFIX
    for layout in loads:
        for r in pool2.run(prefix_jobs.load_job, str(hf_dir), *layout, str(ckpt), IDS, fields):
            if r["logits"] is not None:
                torch.testing.assert_close(r["logits"], logits, atol=1e-5, rtol=1e-5)
            assert "cannot merge prefix adapter(s) ['default']" in r["merge"]

    out = export_peft_from_checkpoint(ckpt, tmp_path / "peft", hf_dir)
    written = json.loads((out / "adapter_config.json").read_text())
    assert {k: written[k] for k in ("peft_type", "task_type", "num_virtual_tokens", "token_dim", "num_attention_heads",
                                    "num_layers", "num_transformer_submodules", "prefix_projection")} == {
        "peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": N_PREFIX, "token_dim": 24,
        "num_attention_heads": 2, "num_layers": 2, "num_transformer_submodules": 1,
        "prefix_projection": variant == "projection"}
    assert list(load_file(str(out / "adapter_model.safetensors"))) == ["prompt_embeddings"]
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(model, out).eval()
    with torch.no_grad():
        ours = peft_model(input_ids=IDS).logits.float()
        with peft_model.disable_adapter():
            base = peft_model(input_ids=IDS).logits.float()
    assert (ours - base).abs().max() > 1e-2, "the prefix must change the logits"
    torch.testing.assert_close(ours, logits, atol=1e-4, rtol=0)
    for source in (ckpt, out):
        with pytest.raises(CheckpointError, match="cannot merge a prefix-tuning adapter.*changes no weight"):
            merge_into_hf(source, hf_dir, tmp_path / "merged", progress=False)
        assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("variant", ["table", "projection"])
def test_save_pretrained_and_from_pretrained_speak_peft(pool2, hf_dir, tmp_path, variant):
    """PEFT's own save_pretrained directory loads into Megatron (TP=1, and TP=2 + SP: each rank
    slices its layers' KV groups) with PEFT's logits; ours (TP=1) loads into PEFT with ours.  A
    prefix_projection file holds the MLP's output: it loads frozen, as PEFT's inference mode, and
    is refused trainable, naming why."""
    from peft import PeftModel
    from peft import PrefixTuningConfig as PeftPrefixTuningConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    fields, state = ({}, {"prompt_embeddings": TABLE}) if variant == "table" else (PROJECTION, _encoder_state())
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    written = get_peft_model(hf, PeftPrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_PREFIX, **fields))
    encoder = written.prompt_encoder["default"]
    with torch.no_grad():
        if variant == "table":
            encoder.embedding.weight.copy_(TABLE.flip(0) * 0.7)
        else:
            encoder.load_state_dict({k: v.flip(0) * 0.7 for k, v in state.items()})
        expected = written(input_ids=IDS).logits.float()
    written.save_pretrained(tmp_path / "by_peft")
    for tp, sp, out in ((1, False, str(tmp_path / "ours")), (2, True, None)):
        for r in pool2.run(prefix_jobs.pretrained_job, str(hf_dir), tp, sp, out, str(tmp_path / "by_peft"), IDS,
                           fields, state):
            torch.testing.assert_close(r["loaded"], expected, atol=1e-5, rtol=0)  # PEFT's files into Megatron
            assert r["trainable"] == 0
            if variant == "projection":
                assert "holds the MLP's output" in r["trainable_load"]
            else:
                assert r["trainable_load"] == ""
            if out is None:
                continue
            assert json.loads((tmp_path / "ours" / "rank0" / "adapter_config.json").read_text())["token_dim"] == 24
            fresh = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
            peft_model = PeftModel.from_pretrained(fresh, r["dir"]).eval()  # ours into PEFT
            with torch.no_grad():
                ours = peft_model(input_ids=IDS).logits.float()
            assert (ours - expected).abs().max() > 1e-2  # the two directories hold different prefixes
            torch.testing.assert_close(ours, r["saved"], atol=1e-5, rtol=0)
