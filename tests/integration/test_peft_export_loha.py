"""PEFT export and offline merge of LoHa on the four linears of a tiny Llama trained at TP=2.
LoHa's update is row-wise (row j of dW needs rows j of w1a and w2a only), so linear_qkv's q/k/v
and linear_fc1's gate/up parts are LoHa adapters of their own: w1a, w2a split by rows, w1b, w2b
shared.  Oracle: PEFT + transformers loading the export onto the HF model reproduce the Megatron
adapted logits (fp32, 1e-4) with no key left unloaded; the merged checkpoint reproduces them in
plain transformers.
"""
import json
import warnings

import pytest
import torch

from parallel_adapters.checkpoint.export import export_peft_from_checkpoint
from parallel_adapters.checkpoint.merge import merge_into_hf
from tests.helpers.tiny_llama import hf_logits, make_tiny_llama, sample_ids

IDS = sample_ids()
TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]


def loha_export_job(hf_dir: str, ckpt_dir: str, input_ids: torch.Tensor) -> dict:
    """TP=2: import, LoHa on the four linears (every factor random), logits, sharded save."""
    from parallel_adapters import LoHaConfig, get_adapter_model
    from parallel_adapters.checkpoint.adapter_io import checkpoint_config
    from parallel_adapters.checkpoint.sharded import save_sharded
    from parallel_adapters.mcore.gpt import gpt_logits
    from tests.mcore.hf_jobs import _imported_model, _setup

    groups = _setup(2, 1)
    model, _, _ = _imported_model(hf_dir, groups)
    config = LoHaConfig(r=4, alpha=8, target_modules=TARGETS, init_weights=False, seed=3,
                        rank_pattern={"layers.1.mlp.linear_fc1": 2})
    adapter = get_adapter_model(model, config, groups=groups)
    with torch.no_grad():
        with adapter.disable_adapter():
            base = gpt_logits(adapter.model, input_ids)
        adapted = gpt_logits(adapter.model, input_ids)
    save_sharded(ckpt_dir, adapter.adapter_state_dict(), groups, config=checkpoint_config(adapter), rng_state=False)
    return {"base": base, "adapted": adapted}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, pool2):
    root = tmp_path_factory.mktemp("loha")
    hf_dir = make_tiny_llama(root / "hf")
    result = pool2.run(loha_export_job, str(hf_dir), str(root / "ckpt"), IDS)[0]
    peft_dir = export_peft_from_checkpoint(root / "ckpt", root / "peft", hf_dir)
    return {"hf": hf_dir, "root": root, "peft": peft_dir, **result}


def test_peft_reproduces_the_megatron_logits(exported):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert (exported["adapted"] - exported["base"]).abs().max() > 1e-3, "the adapter must change the logits"
    model = AutoModelForCausalLM.from_pretrained(exported["hf"], dtype=torch.float32).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(model, exported["peft"]).eval()
    assert not [w for w in caught if "adapter keys" in str(w.message)], [str(w.message) for w in caught]
    config = json.loads((exported["peft"] / "adapter_config.json").read_text())
    assert config["peft_type"] == "LOHA" and config["r"] == 4 and config["alpha"] == 8
    assert config["rank_pattern"] == {"model.layers.1.mlp.gate_proj": 2, "model.layers.1.mlp.up_proj": 2}
    state = peft_model.state_dict()
    assert len([k for k in state if k.endswith("hada_w1_a.default")]) == 2 * 7  # q/k/v and gate/up split
    with torch.no_grad():
        logits = peft_model(input_ids=IDS).logits.float()
    torch.testing.assert_close(logits, exported["adapted"], atol=1e-4, rtol=0)


def test_merge_reproduces_the_logits(exported):
    out = exported["root"] / "merged"
    for source in (exported["root"] / "ckpt", exported["peft"]):
        merged = merge_into_hf(source, exported["hf"], out, progress=False, overwrite=True)
        torch.testing.assert_close(hf_logits(merged, IDS), exported["adapted"], atol=1e-4, rtol=0)
