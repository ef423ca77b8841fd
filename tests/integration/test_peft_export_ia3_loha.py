"""PEFT export and offline merge of LoHa and IA3 on the four linears of a tiny model trained at TP=2
(TRAIN_STEPS AdamW steps from random adapter tensors, then the sharded checkpoint).

LoHa's update is row-wise (row j of dW needs rows j of w1a and w2a only), so linear_qkv's q/k/v
and linear_fc1's gate/up parts are LoHa adapters of their own: w1a, w2a split by rows, w1b, w2b
shared.  IA3 scales k/v (linear_qkv), up (linear_fc1) and o_proj outputs and down_proj's input:
its vectors split into k_proj / v_proj / up_proj, q_proj and gate_proj get none; on a Qwen2 the
k/v biases are scaled too (LoHa leaves them as they are).  Oracle: PEFT + transformers loading the export onto the HF model
reproduce the Megatron adapted logits (fp32, 1e-4) with no key left unloaded; the merged
checkpoint reproduces them in plain transformers.
"""
import json
import warnings

import pytest
import torch

from parallel_adapters.checkpoint.export import export_peft_from_checkpoint
from parallel_adapters.checkpoint.merge import merge_into_hf
from tests.helpers.tiny_llama import hf_logits, make_tiny_llama, make_tiny_qwen2, sample_ids

IDS = sample_ids()
TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
CASES = {"llama_loha": make_tiny_llama, "qwen2_loha": make_tiny_qwen2, "llama_ia3": make_tiny_llama,
         "qwen2_ia3": make_tiny_qwen2}


def _config(kind):
    from parallel_adapters import IA3Config, LoHaConfig

    if kind == "loha":
        return LoHaConfig(r=4, alpha=8, target_modules=TARGETS, init_weights=False, seed=3,
                          rank_pattern={"layers.1.mlp.linear_fc1": 2})
    return IA3Config(target_modules=TARGETS, feedforward_modules=["linear_fc2"], init_ia3_weights=False, seed=3,
                     fused_parts={"linear_qkv": ["k", "v"], "linear_fc1": ["up"]})


TRAIN_STEPS = 2


def train_steps(adapter, input_ids: torch.Tensor, steps: int) -> list[float]:
    """`steps` AdamW steps (lr 1e-2) on next-token loss over `input_ids` (every rank the same
    rows), finalize_grads before each step: the losses."""
    optimizer = torch.optim.AdamW([p for p in adapter.parameters() if p.requires_grad], lr=1e-2)
    labels = torch.roll(input_ids, -1, dims=1)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = adapter.model(input_ids, None, None, labels=labels).mean()
        loss.backward()
        adapter.finalize_grads()
        optimizer.step()
        losses.append(loss.item())
    return losses


def export_job(hf_dir: str, ckpt_dir: str, input_ids: torch.Tensor, kind: str, steps: int = TRAIN_STEPS) -> dict:
    """TP=2: import, the kind on the four linears (every tensor random), `steps` AdamW steps,
    logits, sharded save."""
    from parallel_adapters import get_adapter_model
    from parallel_adapters.checkpoint.adapter_io import checkpoint_config
    from parallel_adapters.checkpoint.sharded import save_sharded
    from parallel_adapters.mcore.gpt import gpt_logits
    from tests.mcore.hf_jobs import _imported_model, _setup

    groups = _setup(2, 1)
    model, _, _ = _imported_model(hf_dir, groups)
    adapter = get_adapter_model(model, _config(kind), groups=groups)
    losses = train_steps(adapter, input_ids, steps)
    with torch.no_grad():
        with adapter.disable_adapter():
            base = gpt_logits(adapter.model, input_ids)
        adapted = gpt_logits(adapter.model, input_ids)
    save_sharded(ckpt_dir, adapter.adapter_state_dict(), groups, config=checkpoint_config(adapter), rng_state=False)
    return {"base": base, "adapted": adapted, "losses": losses}


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory, pool2):
    root = tmp_path_factory.mktemp(request.param)
    hf_dir = CASES[request.param](root / "hf")
    kind = request.param.split("_")[1]
    result = pool2.run(export_job, str(hf_dir), str(root / "ckpt"), IDS, kind)[0]
    peft_dir = export_peft_from_checkpoint(root / "ckpt", root / "peft", hf_dir)
    return {"name": request.param, "kind": kind, "hf": hf_dir, "root": root, "peft": peft_dir, **result}


def load_trained_export(exported: dict):
    """PEFT's model of the trained export on the HF base (no adapter key left unloaded) and its
    adapter_config.json; the adapter must have trained and changed the logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert (exported["adapted"] - exported["base"]).abs().max() > 1e-3, "the adapter must change the logits"
    losses = exported["losses"]
    assert len(losses) == TRAIN_STEPS and losses[-1] < losses[0], f"the adapter must have trained: {losses}"
    model = AutoModelForCausalLM.from_pretrained(exported["hf"], dtype=torch.float32).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(model, exported["peft"]).eval()
    assert not [w for w in caught if "adapter keys" in str(w.message)], [str(w.message) for w in caught]
    config = json.loads((exported["peft"] / "adapter_config.json").read_text())
    return peft_model, config


def test_peft_reproduces_the_megatron_logits(exported):
    peft_model, config = load_trained_export(exported)
    state = peft_model.state_dict()
    if exported["kind"] == "loha":
        assert config["peft_type"] == "LOHA" and config["r"] == 4 and config["alpha"] == 8
        assert config["rank_pattern"] == {"model.layers.1.mlp.gate_proj": 2, "model.layers.1.mlp.up_proj": 2}
        assert len([k for k in state if k.endswith("hada_w1_a.default")]) == 2 * 7  # q/k/v and gate/up split
    else:
        assert config["peft_type"] == "IA3" and config["feedforward_modules"] == ["down_proj"]
        assert sorted(config["target_modules"]) == ["down_proj", "k_proj", "o_proj", "up_proj", "v_proj"]
        vectors = {k.split(".")[-3]: tuple(state[k].shape) for k in state if k.endswith("ia3_l.default")}
        assert len([k for k in state if k.endswith("ia3_l.default")]) == 2 * 5
        assert vectors["down_proj"][0] == 1 and vectors["k_proj"][1] == 1  # input / output scaling
    with torch.no_grad():
        logits = peft_model(input_ids=IDS).logits.float()
    torch.testing.assert_close(logits, exported["adapted"], atol=1e-4, rtol=0)


def test_merge_reproduces_the_logits(exported):
    out = exported["root"] / "merged"
    for source in (exported["root"] / "ckpt", exported["peft"]):
        merged = merge_into_hf(source, exported["hf"], out, progress=False, overwrite=True)
        torch.testing.assert_close(hf_logits(merged, IDS), exported["adapted"], atol=1e-4, rtol=0)
