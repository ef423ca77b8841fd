"""The offline CLI end to end on a real model-level checkpoint (docs/design.md section 6).

A tiny HF Llama is imported into Megatron at TP=2, LoRA with non-zero B (one rank and one alpha
overridden) goes on all four linears, and `save_checkpoint(model, dir)` writes the sharded
checkpoint on both ranks.  Then, as real subprocesses (`python -m parallel_adapters ...`):

    export CKPT --format peft --out OUT --hf-config HF_DIR   -> peft.PeftModel on the HF model
    merge  CKPT --base HF_DIR --out MERGED                   -> plain transformers
    inspect CKPT

Oracle: the Megatron adapted logits (fp32, 1e-4), which must differ from the base logits (> 1e-3)
so that an adapter silently left at zero cannot pass.  Setup and model loading reuse the PEFT
export test's helpers (tests/mcore/hf_jobs.py, tests/integration/test_peft_export.py).
"""
import json
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from parallel_adapters.checkpoint.outputs import OUTPUT_MARKER
from tests.helpers.tiny_llama import make_tiny_llama, sample_ids
from tests.integration.test_cli_offline import _cli
from tests.integration.test_peft_export import _llama, _logits
from tests.mcore import hf_jobs

IDS = sample_ids()
RANK_PATTERN = {"layers.0.mlp.linear_fc1": 6}
ALPHA_PATTERN = {"layers.1.self_attention.linear_proj": 5.0}


def cli_checkpoint_job(hf_dir: str, ckpt_dir: str, input_ids: torch.Tensor) -> dict:
    """TP=2 (pool2): import, LoRA with non-zero B, base / adapted logits, model-level save."""
    from parallel_adapters import LoraConfig, get_adapter_model
    from parallel_adapters.checkpoint.adapter_io import save_checkpoint
    from parallel_adapters.mcore.gpt import gpt_logits

    groups = hf_jobs._setup(2, 1)
    model, _, _ = hf_jobs._imported_model(hf_dir, groups)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=hf_jobs.TARGETS, init_lora_weights=False, seed=11,
                        rank_pattern=RANK_PATTERN, alpha_pattern=ALPHA_PATTERN)
    adapter = get_adapter_model(model, config, groups=groups)
    with torch.no_grad():
        with adapter.disable_adapter():
            base = gpt_logits(adapter.model, input_ids)
        adapted = gpt_logits(adapter.model, input_ids)
    path = save_checkpoint(adapter, ckpt_dir)
    names = sorted(adapter.adapter_state_dict())
    return {"base": base, "adapted": adapted, "path": str(path), "names": names}


@pytest.fixture(scope="module")
def saved(tmp_path_factory, pool2):
    root = tmp_path_factory.mktemp("cli_export")
    hf_dir = make_tiny_llama(root / "hf")
    r0, r1 = pool2.run(cli_checkpoint_job, str(hf_dir), str(root / "ckpt" / "step-1"), IDS)
    torch.testing.assert_close(r0["adapted"], r1["adapted"], atol=0, rtol=0)
    assert r0["path"] == r1["path"]
    return {"hf": hf_dir, "root": root, "ckpt": r0["path"], "base": r0["base"], "adapted": r0["adapted"],
            "names": r0["names"]}


@pytest.fixture(scope="module")
def cli(saved):
    """The CLI subprocesses, started together (they are independent; this overlaps their
    interpreter and torch start-up with each other and with this process loading transformers)."""
    ckpt, hf, root = saved["ckpt"], str(saved["hf"]), saved["root"]
    with ThreadPoolExecutor(4) as pool:
        yield {
            "export": pool.submit(_cli, "export", ckpt, "--format", "peft", "--out", str(root / "peft"),
                                  "--hf-config", hf),
            "merge": pool.submit(_cli, "merge", ckpt, "--base", hf, "--out", str(root / "merged")),
            "inspect": pool.submit(_cli, "inspect", ckpt),
            "export_bf16": pool.submit(_cli, "export", ckpt, "--out", str(root / "peft_bf16"), "--hf-config", hf,
                                       "--dtype", "bfloat16"),
        }


def test_adapter_changes_the_logits(saved):
    assert (saved["adapted"] - saved["base"]).abs().max() > 1e-3


def test_cli_export_loads_in_peft_with_megatron_logits(saved, cli):
    from peft import PeftModel

    out = saved["root"] / "peft"
    result = cli["export"].result()
    assert "wrote PEFT adapter" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_MARKER, "adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(saved["hf"])
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    assert config["rank_pattern"] == {"model.layers.0.mlp.gate_proj": 6, "model.layers.0.mlp.up_proj": 6}
    assert config["alpha_pattern"] == {"model.layers.1.self_attn.o_proj": 5.0}

    hf_model = _llama(saved["hf"])
    torch.testing.assert_close(_logits(hf_model), saved["base"], atol=1e-4, rtol=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(hf_model, out).eval()
    assert not [w for w in caught if "adapter keys" in str(w.message)], [str(w.message) for w in caught]
    assert sum(".lora_A." in k for k in peft_model.state_dict()) == 2 * 7  # 7 HF linears, 2 layers
    logits = _logits(peft_model)
    torch.testing.assert_close(logits, saved["adapted"], atol=1e-4, rtol=0)
    assert (logits - saved["base"]).abs().max() > 1e-3


def test_cli_merge_gives_megatron_logits_with_plain_transformers(saved, cli):
    merged = saved["root"] / "merged"
    result = cli["merge"].result()
    assert "wrote merged Hugging Face model" in result.stdout
    assert json.loads((merged / "config.json").read_text()) == json.loads((saved["hf"] / "config.json").read_text())
    logits = _logits(_llama(merged))
    torch.testing.assert_close(logits, saved["adapted"], atol=1e-4, rtol=0)
    assert (logits - saved["base"]).abs().max() > 1e-3


def test_cli_inspect_describes_the_model_checkpoint(saved, cli):
    out = cli["inspect"].result().stdout
    assert "tp=2 pp=1 dp=1" in out and "r=4 lora_alpha=8" in out
    assert f"{len(saved['names'])} tensors" in out and len(saved["names"]) == 2 * 4 * 2
    lines = out.splitlines()
    for name in saved["names"]:
        row = next(line for line in lines if line.startswith(name + " "))
        replicated = ("linear_qkv.lora_A" in name or "linear_fc1.lora_A" in name
                      or "linear_proj.lora_B" in name or "linear_fc2.lora_B" in name)
        assert ("replicated" in row) == replicated, row
    fc1_b = next(line for line in lines if line.startswith("decoder.layers.0.mlp.linear_fc1.lora_B"))
    assert "160x6" in fc1_b and "dim 0 x2 chunks" in fc1_b  # rank_pattern: r=6 on layer 0's fc1
    # 2 shard files, config, RNG state of both ranks (save_checkpoint always saves it)
    assert "5 files" in out


def test_cli_export_casts_with_dtype(saved, cli):
    from safetensors.torch import load_file

    assert "(bfloat16)" in cli["export_bf16"].result().stdout
    cast = load_file(str(saved["root"] / "peft_bf16" / "adapter_model.safetensors"))
    cli["export"].result()
    full = load_file(str(saved["root"] / "peft" / "adapter_model.safetensors"))
    assert cast.keys() == full.keys() and {t.dtype for t in cast.values()} == {torch.bfloat16}
    assert all(torch.equal(cast[k], full[k].to(torch.bfloat16)) for k in full)
