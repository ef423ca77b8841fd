"""The MoE keys of the run config (moe.*, parallel.expert, parallel.expert_tensor): each impossible
or ignored value is refused before any process group starts, naming its key.  That each key
reaches the model or the layout is tests/unit/train/test_run_config_fields.py's; that a MoE run
trains at EP=2 and TP=2 x EP=2 as at world size 1 is tests/integration/test_train_moe.py's."""
from __future__ import annotations

from pathlib import Path

import pytest

from parallel_adapters.train import runner
from parallel_adapters.train.run_config import load_run_config
from parallel_adapters.train.validate import check_parallel_layout, validate_run_config

REPO = Path(__file__).resolve().parents[3]
MOE = ["moe.num_experts=4"]


@pytest.fixture(scope="module")
def hf_moe(tmp_path_factory) -> str:
    """A Qwen3-MoE config.json with 6 experts (no weights: validation reads only the config)."""
    from transformers import Qwen3MoeConfig

    path = tmp_path_factory.mktemp("hf_moe") / "qwen3_moe"
    Qwen3MoeConfig(vocab_size=300, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=6,
                   num_experts_per_tok=2, max_position_embeddings=128).save_pretrained(path)
    return str(path)


def _check(overrides: list[str], world: int = 4, hf: str = "") -> None:
    config = load_run_config(None, [o.replace("{hf}", hf) for o in overrides])
    validate_run_config(config)
    check_parallel_layout(world, config)


@pytest.mark.parametrize("overrides,world,named", [
    (["parallel.expert=2"], 2, r"parallel\.expert and parallel\.expert_tensor .* dense"),
    (["parallel.expert_tensor=1"], 2, r"parallel\.expert and parallel\.expert_tensor .* dense"),
    (["moe.num_experts=3", "parallel.expert=2"], 2, r"moe\.num_experts=3 does not divide by parallel\.expert=2"),
    (MOE + ["parallel.expert=4", "parallel.expert_tensor=2"], 4,
     r"parallel\.expert_tensor=2 x parallel\.expert=4 x parallel\.pipeline=1 = 8 does not divide the world size 4"),
    (MOE + ["parallel.expert=2", "parallel.pipeline=2", "parallel.expert_tensor=2"], 4, r"= 8 does not divide"),
    (MOE + ["moe.ffn_hidden_size=63", "parallel.expert_tensor=2"], 2,
     r"moe\.ffn_hidden_size=63 .* parallel\.expert_tensor=2"),
    (MOE + ["parallel.tensor=2"], 2, r"parallel\.sequence_parallel must be true for a MoE model"),
    (MOE + ["parallel.expert=2", f"deepspeed={REPO}/configs/deepspeed/zero1.json"], 2,
     r"deepspeed: .*parallel\.expert=2"),
    (MOE + ["moe.topk=5"], 1, r"moe\.topk=5 must be in 1\.\.moe\.num_experts=4"),
    (MOE + ["moe.router_dtype=fp16"], 1, r"moe\.router_dtype must be null or one of"),
    (MOE + ["moe.aux_loss_coeff=-0.1"], 1, r"moe\.aux_loss_coeff must be >= 0"),
    (MOE + ["moe.dispatcher=flex"], 1, r"moe\.dispatcher must be one of \['allgather', 'alltoall'\]"),
    (MOE + ["moe.capacity_factor=0.0"], 1, r"moe\.capacity_factor must be > 0 or null"),
    (MOE + ["moe.capacity_factor=1.0", "moe.drop_policy=fifo"], 1, r"moe\.drop_policy must be one of"),
    (MOE + ["moe.drop_policy=position"], 1, r"moe\.drop_policy='position' needs moe\.capacity_factor"),
    (["moe.capacity_factor=1.0"], 1, r"moe\.capacity_factor needs a MoE model"),
    (["adapter.share_expert_adapters=true"], 1, r"adapter\.share_expert_adapters=true .* this model is dense"),
    (["moe.num_experts=0"], 1, r"moe\.num_experts must be >= 1"),
    (["moe.topk=1"], 1, r"moe\.topk needs a MoE model"),
    (["moe.aux_loss_coeff=0.01"], 1, r"moe\.aux_loss_coeff needs a MoE model"),
    (["model.hf_checkpoint={hf}", "moe.num_experts=8"], 1, r"moe\.num_experts=8 is ignored with model\.hf_checkpoint"),
    (["model.hf_checkpoint={hf}", "moe.topk=1"], 1, r"moe\.topk=1 is ignored with model\.hf_checkpoint"),
    (["model.hf_checkpoint={hf}", "parallel.expert=4"], 4,
     r"the HF checkpoint's num_experts=6 does not divide by parallel\.expert=4"),
])
def test_impossible_or_ignored_moe_keys_are_refused_naming_them(overrides, world, named, hf_moe):
    with pytest.raises(ValueError, match=named):
        _check(overrides, world, hf_moe)


def test_hf_moe_checkpoint_takes_experts_from_config_json_and_training_options_from_the_run_config(hf_moe):
    config = load_run_config(None, [f"model.hf_checkpoint={hf_moe}", "parallel.expert=2", "moe.aux_loss_coeff=0.01",
                                    "moe.router_dtype=fp64"])
    validate_run_config(config)
    layout = check_parallel_layout(2, config)
    assert (layout.expert, layout.expert_tensor, layout.data) == (2, 1, 2)
    settings = runner.gpt_settings(config, 1)
    assert (settings.num_moe_experts, settings.moe_router_topk, settings.moe_ffn_hidden_size) == (6, 2, 32)
    assert (settings.moe_aux_loss_coeff, settings.moe_router_dtype) == (0.01, "fp64")


def test_tiny_moe_config_is_valid_at_ep2_and_tp2_x_ep2():
    for world, overrides in ((2, []), (4, ["parallel.tensor=2", "parallel.sequence_parallel=true"])):
        config = load_run_config(REPO / "configs" / "tiny_moe.yaml", overrides)
        validate_run_config(config)
        layout = check_parallel_layout(world, config)
        assert layout.expert == 2 and runner.gpt_settings(config, layout.tensor).num_moe_experts == 4


def test_qwen3_30b_a3b_example_layout_is_valid_on_8_ranks(tmp_path):
    """configs/qwen3_30b_a3b_tp2_ep4.yaml against Qwen3-30B-A3B's config.json (its published shape)."""
    from transformers import Qwen3MoeConfig

    Qwen3MoeConfig(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                   num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                   num_experts=128, num_experts_per_tok=8, max_position_embeddings=40960).save_pretrained(tmp_path)
    config = load_run_config(REPO / "configs" / "qwen3_30b_a3b_tp2_ep4.yaml",
                             [f"model.hf_checkpoint={tmp_path}", "data.paths=[]"])
    validate_run_config(config)
    layout = check_parallel_layout(8, config)
    assert (layout.tensor, layout.expert, layout.expert_tensor, layout.pipeline, layout.data) == (2, 4, 2, 1, 4)
    settings = runner.gpt_settings(config, layout.tensor)
    assert (settings.num_moe_experts, settings.moe_router_topk, settings.moe_ffn_hidden_size) == (128, 8, 768)
    experts = settings.num_layers * settings.num_moe_experts * 3 * settings.hidden_size * settings.moe_ffn_hidden_size
    per_rank = experts / (layout.expert * layout.expert_tensor) * 2  # bytes of bfloat16
    assert 7.0e9 < per_rank < 7.5e9  # the header's 3.62e9 expert parameters a rank


def test_alltoall_dispatcher_is_refused_on_the_cpu_by_name_and_allowed_with_cuda(monkeypatch):
    """Checked in validate_run_config (no process group): Megatron's alltoall dispatcher creates
    CUDA streams, so without a GPU it is refused naming the key; with one it reaches GPTSettings."""
    import torch

    overrides = MOE + ["moe.dispatcher=alltoall", "parallel.expert=2"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"moe\.dispatcher='alltoall' needs CUDA .* moe\.dispatcher=allgather"):
        _check(overrides, 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    _check(overrides, 2)
    assert runner.gpt_settings(load_run_config(None, overrides), 1).moe_token_dispatcher_type == "alltoall"


def test_capacity_factor_and_drop_policy_reach_megatron_settings():
    config = load_run_config(None, MOE + ["moe.capacity_factor=1.25", "moe.drop_policy=position"])
    validate_run_config(config)
    settings = runner.gpt_settings(config, 1)
    assert (settings.moe_expert_capacity_factor, settings.moe_token_drop_policy) == (1.25, "position")


def test_grouped_gemm_is_refused_without_cuda_or_the_package_and_reaches_megatron_settings(monkeypatch, hf_moe):
    """moe.grouped_gemm (Megatron's GroupedMLP) is checked before any process group: refused by
    name without CUDA or without grouped_gemm, with an HF checkpoint (its import fills SequentialMLP
    experts) and on a dense model; otherwise it reaches GPTSettings.moe_grouped_gemm."""
    import importlib.util

    import torch

    from parallel_adapters.train import validate

    grouped = MOE + ["moe.grouped_gemm=true"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"moe\.grouped_gemm=true needs CUDA and the grouped_gemm package"):
        _check(grouped, 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(validate.importlib.util, "find_spec",
                        lambda name, *a: None if name == "grouped_gemm" else real_find_spec(name, *a))
    with pytest.raises(ValueError, match=r"moe\.grouped_gemm=true needs CUDA and the grouped_gemm package"):
        _check(grouped, 1)
    monkeypatch.setattr(validate.importlib.util, "find_spec",
                        lambda name, *a: object() if name == "grouped_gemm" else real_find_spec(name, *a))
    _check(grouped + ["parallel.expert=2"], 2)
    assert runner.gpt_settings(load_run_config(None, grouped), 1).moe_grouped_gemm is True
    assert runner.gpt_settings(load_run_config(None, MOE), 1).moe_grouped_gemm is False
    with pytest.raises(ValueError, match=r"moe\.grouped_gemm=true with model\.hf_checkpoint"):
        _check(["model.hf_checkpoint={hf}", "moe.grouped_gemm=true"], 1, hf_moe)
    with pytest.raises(ValueError, match=r"moe\.grouped_gemm needs a MoE model"):
        _check(["moe.grouped_gemm=true"], 1)
