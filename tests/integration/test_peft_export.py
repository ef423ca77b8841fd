"""PEFT export oracle (docs/design.md section 6).

A tiny HF Llama is imported into Megatron at TP=2, LoRA (non-zero B, one layer's rank and
another's alpha overridden) is put on all four linears, and the adapters are saved sharded.
Exported to PEFT format and loaded by `peft.PeftModel.from_pretrained` onto the SAME HF model,
the adapter must reproduce the Megatron adapted logits (fp32, 1e-4) with no key left unloaded;
the model written by `merge_into_hf` must give the same logits with plain transformers.
"""
import json
import re
import warnings

import pytest
import torch
from safetensors import safe_open

from parallel_adapters.checkpoint.consolidate import consolidate
from parallel_adapters.checkpoint.export import export_peft, export_peft_from_checkpoint, load_checkpoint_factors
from parallel_adapters.checkpoint.merge import merge_into_hf
from parallel_adapters.config import LoraConfig
from parallel_adapters.hf.files import HFCheckpoint
from tests.helpers.tiny_llama import make_tiny_llama, sample_ids
from tests.mcore import hf_jobs

IDS = sample_ids()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, pool2):
    root = tmp_path_factory.mktemp("peft")
    hf_dir = make_tiny_llama(root / "hf")
    ckpt = root / "ckpt"
    results = pool2.run(hf_jobs.peft_job, str(hf_dir), str(ckpt), IDS)
    return {"hf": hf_dir, "ckpt": ckpt, "root": root, "results": results}


@pytest.fixture(scope="module")
def exported(trained):
    return export_peft_from_checkpoint(trained["ckpt"], trained["root"] / "peft", trained["hf"])


def _llama(path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def test_tp_replicated_factors_agree_and_ranks_see_the_same_logits(trained):
    r0, r1 = trained["results"]
    assert r0["replicas"] and all(r0["replicas"].values()) and all(r1["replicas"].values())
    assert len(r0["replicas"]) == 2 * 4  # A of qkv/fc1 and B of proj/fc2, in 2 layers
    torch.testing.assert_close(r0["adapted"], r1["adapted"], atol=0, rtol=0)


def test_peft_reproduces_megatron_adapted_logits(trained, exported):
    from peft import PeftModel

    megatron_base, megatron_adapted = trained["results"][0]["base"], trained["results"][0]["adapted"]
    assert (megatron_adapted - megatron_base).abs().max() > 1e-3, "the adapter must change the logits"
    hf_model = _llama(trained["hf"])
    torch.testing.assert_close(_logits(hf_model), megatron_base, atol=1e-4, rtol=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(hf_model, exported).eval()
    assert not [w for w in caught if "adapter keys" in str(w.message)], [str(w.message) for w in caught]
    torch.testing.assert_close(_logits(peft_model), megatron_adapted, atol=1e-4, rtol=0)

    with safe_open(str(exported / "adapter_model.safetensors"), framework="pt") as fh:
        saved = {k: fh.get_tensor(k) for k in fh.keys()}
    loaded = {k: v for k, v in peft_model.state_dict().items() if ".lora_" in k}
    assert len(loaded) == len(saved) == 2 * 7 * 2  # 7 HF modules per layer, A and B, 2 layers
    for key, tensor in saved.items():
        peft_key = re.sub(r"\.(lora_[AB])\.weight$", r".\1.default.weight", key)
        assert torch.equal(loaded[peft_key], tensor), key
        assert tensor.abs().max() > 0, key


def test_adapter_config_records_patterns_and_hf_names(exported):
    config = json.loads((exported / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 8, False)
    hf_names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert config["target_modules"] == sorted(hf_names)
    assert config["rank_pattern"] == {f"model.layers.1.self_attn.{p}_proj": 6 for p in "qkv"}
    assert config["alpha_pattern"] == {"model.layers.0.mlp.down_proj": 3.0}


def test_qkv_and_fc1_factors_are_split_from_the_fused_ones(trained, exported):
    full = consolidate(trained["ckpt"])
    with safe_open(str(exported / "adapter_model.safetensors"), framework="pt") as fh:
        get = fh.get_tensor
        p = "base_model.model.model.layers.1."
        a = full["decoder.layers.1.self_attention.linear_qkv.lora_A.default.weight"]
        b = full["decoder.layers.1.self_attention.linear_qkv.lora_B.default.weight"]  # [2 x (2q + k + v) x 12, 6]
        for n in "qkv":
            assert torch.equal(get(p + f"self_attn.{n}_proj.lora_A.weight"), a)
        groups = b.view(2, 4, 12, 6)  # per query group: 2 q heads, k, v
        assert torch.equal(get(p + "self_attn.q_proj.lora_B.weight"), groups[:, :2].reshape(48, 6))
        assert torch.equal(get(p + "self_attn.k_proj.lora_B.weight"), groups[:, 2].reshape(24, 6))
        assert torch.equal(get(p + "self_attn.v_proj.lora_B.weight"), groups[:, 3].reshape(24, 6))
        fc1_b = full["decoder.layers.1.mlp.linear_fc1.lora_B.default.weight"]
        assert torch.equal(get(p + "mlp.gate_proj.lora_B.weight"), fc1_b[:80])
        assert torch.equal(get(p + "mlp.up_proj.lora_B.weight"), fc1_b[80:])


def test_export_from_tensors_equals_export_from_checkpoint(trained, exported, tmp_path):
    tensors, config = load_checkpoint_factors(trained["ckpt"])
    out = export_peft(tensors, tmp_path / "peft2", trained["hf"], LoraConfig.from_dict(config))
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (out / name).read_bytes() == (exported / name).read_bytes(), name


def test_merged_hf_model_reproduces_adapted_logits(trained, exported, tmp_path):
    merged = merge_into_hf(trained["ckpt"], trained["hf"], tmp_path / "merged", max_shard_bytes=64_000, progress=False)
    index = json.loads((merged / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    assert json.loads((merged / "config.json").read_text()) == json.loads((trained["hf"] / "config.json").read_text())
    torch.testing.assert_close(_logits(_llama(merged)), trained["results"][0]["adapted"], atol=1e-4, rtol=0)
    from_peft = merge_into_hf(exported, trained["hf"], tmp_path / "merged_from_peft", progress=False)
    a, b = HFCheckpoint(merged), HFCheckpoint(from_peft)
    assert sorted(a.names()) == sorted(b.names())
    assert all(torch.equal(a.read(n), b.read(n)) for n in a.names())


def test_merge_refuses_a_non_empty_output(trained, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="is not empty and not an output of `parallel-adapters merge`"):
        merge_into_hf(trained["ckpt"], trained["hf"], out, progress=False)


# ----------------------------------------------------------------------------------------------
# One process: partial coverage, rsLoRA, refusals
# ----------------------------------------------------------------------------------------------

def _synthetic_factors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "decoder.layers.0.self_attention.linear_proj.lora_A.default.weight": torch.randn(3, 48, generator=g),
        "decoder.layers.0.self_attention.linear_proj.lora_B.default.weight": torch.randn(48, 3, generator=g),
        "decoder.layers.1.mlp.linear_fc1.lora_A.default.weight": torch.randn(5, 48, generator=g),
        "decoder.layers.1.mlp.linear_fc1.lora_B.default.weight": torch.randn(160, 5, generator=g),
    }


def test_partial_coverage_with_rslora_loads_in_peft_like_the_merge(trained, tmp_path):
    """Only some layers adapted: target_modules lists full HF paths, so PEFT adds nothing else;
    PEFT's forward must equal the merged model's (independent code paths over the same factors)."""
    from peft import PeftModel

    from parallel_adapters.checkpoint.export import hf_module_adapters

    config = {"r": 3, "lora_alpha": 6, "use_rslora": True}
    hf_config = json.loads((trained["hf"] / "config.json").read_text())
    factors = hf_module_adapters(_synthetic_factors(), config, hf_config)
    assert factors["model.layers.1.mlp.up_proj"].hparams["scaling"] == pytest.approx(6 / 5 ** 0.5)
    out = export_peft(_synthetic_factors(), tmp_path / "partial", trained["hf"], config)
    written = json.loads((out / "adapter_config.json").read_text())
    assert written["target_modules"] == ["model.layers.0.self_attn.o_proj", "model.layers.1.mlp.gate_proj",
                                         "model.layers.1.mlp.up_proj"]
    assert (written["r"], written["rank_pattern"]) == (5, {"model.layers.0.self_attn.o_proj": 3})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(_llama(trained["hf"]), out).eval()
    assert not [w for w in caught if "adapter keys" in str(w.message)]
    assert sum(".lora_A." in k for k in peft_model.state_dict()) == 3
    merged = merge_into_hf(out, trained["hf"], tmp_path / "partial_merged", progress=False)
    torch.testing.assert_close(_logits(peft_model), _logits(_llama(merged)), atol=1e-4, rtol=0)
    assert (_logits(peft_model) - _logits(_llama(trained["hf"]))).abs().max() > 1e-3


@pytest.mark.parametrize("mutate, message", [
    (lambda t: t | {"decoder.layers.0.mlp.linear_fc1.weight": torch.zeros(160, 48)}, "not a tensor of a lora adapter"),
    (lambda t: {k: v for k, v in t.items() if "linear_proj.lora_B" not in k}, "lora_B is missing"),
    (lambda t: t | {"decoder.layers.1.mlp.linear_fc1.lora_A.default.weight": torch.zeros(5, 40)},
     "along the weight's columns"),
    (lambda t: t | {"decoder.layers.0.self_attention.linear_proj.lora_A.other.weight": torch.zeros(3, 48)},
     "pass adapter_name"),
    (lambda t: t | {"decoder.final_layernorm.lora_A.default.weight": torch.zeros(2, 48),
                    "decoder.final_layernorm.lora_B.default.weight": torch.zeros(48, 2)}, "supports"),
])
def test_export_refuses_what_peft_cannot_represent(trained, tmp_path, mutate, message):
    with pytest.raises(ValueError, match=message):
        export_peft(mutate(_synthetic_factors()), tmp_path / "x", trained["hf"], {"r": 3, "lora_alpha": 6})


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # inside PEFT
def test_qwen2_export_reproduces_in_peft_and_merges(tmp_path, pool2):
    """The same oracle on a Qwen2 base (biases on q/k/v): PEFT on Qwen2ForCausalLM and the
    merged model give the Megatron adapted logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.helpers.tiny_llama import make_tiny_qwen2

    hf_dir = make_tiny_qwen2(tmp_path / "qwen2")
    r0 = pool2.run(hf_jobs.peft_job, str(hf_dir), str(tmp_path / "ckpt"), IDS)[0]
    assert (r0["adapted"] - r0["base"]).abs().max() > 1e-3
    out = export_peft_from_checkpoint(tmp_path / "ckpt", tmp_path / "peft", hf_dir)
    base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    assert type(base).__name__ == "Qwen2ForCausalLM"
    torch.testing.assert_close(_logits(base), r0["base"], atol=1e-4, rtol=0)
    torch.testing.assert_close(_logits(PeftModel.from_pretrained(base, out).eval()), r0["adapted"], atol=1e-4, rtol=0)
    merged = merge_into_hf(tmp_path / "ckpt", hf_dir, tmp_path / "merged")
    merged_model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(merged_model), r0["adapted"], atol=1e-4, rtol=0)
