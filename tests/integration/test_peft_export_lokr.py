"""PEFT export and offline merge of LoKr trained at TP=2 (TRAIN_STEPS AdamW steps from random
tensors, then the sharded checkpoint) on a tiny Llama's unfused linears
(linear_proj -> o_proj [48, 48] = (6x8) x (6x8), linear_fc2 -> down_proj [48, 80] = (6x8) x (8x10)):
Megatron's factorisation of these modules is PEFT's, so the export is exact.  r=2 with
`decompose_both` (every factor a rank-2 product), layer 1's linear_fc2 r=8 (both factors whole,
exported as a rank_pattern).  Oracle: PEFT + transformers loading the export onto the HF model
reproduce the Megatron adapted logits (fp32, 1e-4) with no key left unloaded; the merged checkpoint
(from ours and from the PEFT directory) reproduces them in plain transformers.  On a Llama and on a
Qwen2 (biases on q/k/v, which the import carries and LoKr leaves as they are).  LoKr on the fused
linear_qkv / linear_fc1 trains but is refused at export, naming the module and the reason.
"""

import pytest
import torch

from parallel_adapters.checkpoint.export import export_peft_from_checkpoint
from parallel_adapters.checkpoint.merge import merge_into_hf
from tests.helpers.tiny_llama import hf_logits, make_tiny_llama, make_tiny_qwen2, sample_ids
from tests.integration.test_peft_export_ia3_loha import TRAIN_STEPS, load_trained_export, train_steps

IDS = sample_ids()


def _config(targets, decompose_factor=-1):
    from parallel_adapters import LoKrConfig

    return LoKrConfig(r=2, alpha=3, decompose_both=True, target_modules=targets, init_weights=False, seed=3,
                      decompose_factor=decompose_factor,
                      rank_pattern={"layers.1.mlp.linear_fc2": 8} if "linear_fc2" in targets else {})


def export_job(hf_dir: str, ckpt_dir: str, input_ids: torch.Tensor, targets: list[str],
               decompose_factor: int = -1, steps: int = 0) -> dict:
    """TP=2: import, LoKr on `targets` (every tensor random), `steps` AdamW steps, logits, sharded save."""
    from parallel_adapters import get_adapter_model
    from parallel_adapters.checkpoint.adapter_io import checkpoint_config
    from parallel_adapters.checkpoint.sharded import save_sharded
    from parallel_adapters.mcore.gpt import gpt_logits
    from tests.mcore.hf_jobs import _imported_model, _setup

    groups = _setup(2, 1)
    model, _, _ = _imported_model(hf_dir, groups)
    adapter = get_adapter_model(model, _config(targets, decompose_factor), groups=groups)
    losses = train_steps(adapter, input_ids, steps)
    with torch.no_grad():
        with adapter.disable_adapter():
            base = gpt_logits(adapter.model, input_ids)
        adapted = gpt_logits(adapter.model, input_ids)
    save_sharded(ckpt_dir, adapter.adapter_state_dict(), groups, config=checkpoint_config(adapter), rng_state=False)
    return {"base": base, "adapted": adapted, "losses": losses}


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def exported(request, tmp_path_factory, pool2):
    root = tmp_path_factory.mktemp(f"lokr_{request.param}")
    hf_dir = {"llama": make_tiny_llama, "qwen2": make_tiny_qwen2}[request.param](root / "hf")
    result = pool2.run(export_job, str(hf_dir), str(root / "ckpt"), IDS, ["linear_proj", "linear_fc2"], -1,
                       TRAIN_STEPS)[0]
    peft_dir = export_peft_from_checkpoint(root / "ckpt", root / "peft", hf_dir)
    return {"hf": hf_dir, "root": root, "peft": peft_dir, **result}


def test_peft_reproduces_the_megatron_logits(exported):
    peft_model, config = load_trained_export(exported)
    assert config["peft_type"] == "LOKR" and config["r"] == 2 and config["alpha"] == 3 and config["decompose_both"]
    assert config["rank_pattern"] == {"model.layers.1.mlp.down_proj": 8}
    assert sorted(config["target_modules"]) == ["down_proj", "o_proj"]
    state = peft_model.state_dict()
    assert len([k for k in state if k.endswith("lokr_w1_a.default")]) == 3  # layer 1's down_proj: w1 whole
    assert len([k for k in state if k.endswith("lokr_w1.default")]) == 1
    with torch.no_grad():
        logits = peft_model(input_ids=IDS).logits.float()
    torch.testing.assert_close(logits, exported["adapted"], atol=1e-4, rtol=0)


def test_merge_reproduces_the_logits(exported):
    out = exported["root"] / "merged"
    for source in (exported["root"] / "ckpt", exported["peft"]):
        merged = merge_into_hf(source, exported["hf"], out, progress=False, overwrite=True)
        torch.testing.assert_close(hf_logits(merged, IDS), exported["adapted"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("target,factor,reason", [("linear_qkv", -1, "q/k/v are interleaved"),
                                                  ("linear_fc1", 4, "gate and up")])
def test_fused_modules_train_but_are_refused_at_export(tmp_path, pool2, target, factor, reason):
    """linear_fc1 [160, 48] is (10x16) x (6x8) by default, whose 10 rows of w1 do not split into
    [gate; up] x TP=2; decompose_factor=4 makes it (4x40) x (4x12)."""
    hf_dir = make_tiny_llama(tmp_path / "hf")
    result = pool2.run(export_job, str(hf_dir), str(tmp_path / "ckpt"), IDS, [target], factor)[0]
    assert (result["adapted"] - result["base"]).abs().max() > 1e-3
    with pytest.raises(ValueError, match=rf"decoder.layers.0.*\.{target}: a LoKr adapter on {target} has no exact "
                                         rf"PEFT form \({reason}"):
        export_peft_from_checkpoint(tmp_path / "ckpt", tmp_path / "peft", hf_dir)
