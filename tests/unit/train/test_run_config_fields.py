"""Every run-config key reaches what it configures, and a key that nothing would read is refused.

Reference: the dataclasses of train/run_config.py, walked section by section, so a key added
without a case here fails `test_every_key_has_a_case`.  Per key, the object the run builds from the
config and hands on (runner.adapter_config -> the model, runner.gpt_settings -> build_gpt,
validate.check_parallel_layout, runner.loop_settings -> train_loop, resume.engine_arguments ->
build_engine, runner.build_samples / tokenizer_kind / batch_sampler -> the data) must change when
the key changes.  Keys only a run can show (the export) are checked by
tests/integration/test_run_config_in_runs.py.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import typing
from pathlib import Path

import pytest
import torch

from parallel_adapters.config import EvaConfig, LoraConfig
from parallel_adapters.train import runner
from parallel_adapters.train.resume import engine_arguments
from parallel_adapters.train.run_config import ADAPTER_KINDS, RunConfig, load_run_config
from parallel_adapters.train.validate import check_parallel_layout, validate_run_config

REPO = Path(__file__).resolve().parents[3]
WORLD = 4
EVA_ON = ["adapter.init_lora_weights=eva", "eva={}"]  # configs/demo.yaml's form: EVA asked twice
RUN = "run"  # observed in a run (tests/integration/test_run_config_in_runs.py)

# key: (context overrides for both configs, the changed value, the target that must change)
CASES: dict[str, tuple[list[str], str, str]] = {
    "model.hf_checkpoint": (["data.tokenizer=byte"], "{hf}", "gpt"),
    "model.num_layers": ([], "4", "gpt"),
    "model.hidden_size": ([], "256", "gpt"),
    "model.ffn_hidden_size": ([], "512", "gpt"),
    "model.num_attention_heads": ([], "8", "gpt"),
    "model.num_query_groups": ([], "4", "gpt"),
    "model.vocab_size": ([], "300", "gpt"),
    "model.max_position_embeddings": ([], "512", "gpt"),
    "model.rotary_base": ([], "500000.0", "gpt"),
    "model.tie_embeddings": ([], "true", "gpt"),
    "model.init_seed": ([], "7", "gpt"),
    "model.dtype": ([], "bfloat16", "gpt"),
    "model.recompute": ([], "full", "gpt"),
    "model.attention_dropout": ([], "0.1", "gpt"),
    "model.hidden_dropout": ([], "0.1", "gpt"),
    "parallel.tensor": ([], "2", "layout"),
    "parallel.pipeline": ([], "2", "layout"),
    "parallel.data": (["parallel.tensor=2"], "4", "layout"),  # a check: 2 x 4 != 4 ranks is refused
    "parallel.sequence_parallel": (["parallel.tensor=2"], "true", "gpt"),
    "parallel.expert": (["moe.num_experts=4"], "2", "layout"),
    "parallel.expert_tensor": (["moe.num_experts=4"], "2", "layout"),
    "moe.num_experts": ([], "4", "gpt"),
    "moe.topk": (["moe.num_experts=4"], "1", "gpt"),
    "moe.ffn_hidden_size": (["moe.num_experts=4"], "64", "gpt"),
    "moe.aux_loss_coeff": (["moe.num_experts=4"], "0.01", "gpt"),
    "moe.router_dtype": (["moe.num_experts=4"], "fp64", "gpt"),
    "moe.dispatcher": (["moe.num_experts=4"], "alltoall", "gpt"),  # refused without CUDA
    "moe.capacity_factor": (["moe.num_experts=4"], "1.5", "gpt"),
    "moe.drop_policy": (["moe.num_experts=4", "moe.capacity_factor=1.0"], "position", "gpt"),
    "moe.grouped_gemm": (["moe.num_experts=4"], "true", "gpt"),  # refused without CUDA and grouped_gemm
    "adapter.r": ([], "16", "lora"),
    "adapter.lora_alpha": ([], "32", "lora"),
    "adapter.lora_dropout": ([], "0.1", "lora"),
    "adapter.target_modules": ([], "[linear_qkv]", "lora"),
    "adapter.exclude_modules": ([], "[linear_proj]", "lora"),
    "adapter.layers_to_transform": ([], "[0]", "lora"),
    "adapter.layers_pattern": ([], "layers", "lora"),
    "adapter.rank_pattern": ([], "{linear_qkv: 4}", "lora"),
    "adapter.alpha_pattern": ([], "{linear_qkv: 4}", "lora"),
    "adapter.use_rslora": ([], "true", "lora"),
    "adapter.use_dora": ([], "true", "lora"),
    "adapter.init_lora_weights": ([], "gaussian", "lora"),
    "adapter.bias": ([], "all", "lora"),
    "adapter.modules_to_save": ([], "[final_layernorm]", "lora"),
    "adapter.eva_config": (["adapter.init_lora_weights=eva"], "{rho: 1.5}", "lora"),
    "adapter.corda_config": (["adapter.init_lora_weights=corda"], "{corda_method: kpm}", "lora"),
    "adapter.loftq_config": (["adapter.init_lora_weights=loftq", "adapter.loftq_config={loftq_bits: 4}"],
                             "{loftq_bits: 2}", "lora"),
    "adapter.seed": ([], "5", "lora"),
    "adapter.kind": ([], "loha", "lora"),
    # adapter.kind's other kinds: `adapter.<field>@<kind>` is adapter.<field> with adapter.kind=<kind>
    "adapter.r@loha": ([], "4", "lora"),
    "adapter.alpha@loha": ([], "4", "lora"),
    "adapter.rank_dropout@loha": ([], "0.1", "lora"),
    "adapter.module_dropout@loha": ([], "0.1", "lora"),
    "adapter.target_modules@loha": ([], "[linear_qkv]", "lora"),
    "adapter.exclude_modules@loha": ([], "[linear_proj]", "lora"),
    "adapter.layers_to_transform@loha": ([], "[0]", "lora"),
    "adapter.layers_pattern@loha": ([], "layers", "lora"),
    "adapter.rank_pattern@loha": ([], "{linear_qkv: 4}", "lora"),
    "adapter.alpha_pattern@loha": ([], "{linear_qkv: 4}", "lora"),
    "adapter.init_weights@loha": ([], "false", "lora"),
    "adapter.modules_to_save@loha": ([], "[final_layernorm]", "lora"),
    "adapter.seed@loha": ([], "5", "lora"),
    "adapter.r@lokr": ([], "4", "lora"),
    "adapter.alpha@lokr": ([], "4", "lora"),
    "adapter.rank_dropout@lokr": ([], "0.1", "lora"),
    "adapter.module_dropout@lokr": ([], "0.1", "lora"),
    "adapter.use_effective_conv2d@lokr": ([], "true", "lora"),
    "adapter.use_effective_conv2d@loha": ([], "true", "lora"),
    "adapter.conv_layout": ([], "alf", "lora"),
    "adapter.share_expert_adapters": (["moe.num_experts=4"], "true", "lora"),
    "adapter.decompose_both@lokr": ([], "true", "lora"),
    "adapter.decompose_factor@lokr": ([], "4", "lora"),
    "adapter.rank_dropout_scale@lokr": ([], "true", "lora"),
    "adapter.target_modules@lokr": ([], "[linear_qkv]", "lora"),
    "adapter.exclude_modules@lokr": ([], "[linear_proj]", "lora"),
    "adapter.layers_to_transform@lokr": ([], "[0]", "lora"),
    "adapter.layers_pattern@lokr": ([], "layers", "lora"),
    "adapter.rank_pattern@lokr": ([], "{linear_qkv: 4}", "lora"),
    "adapter.alpha_pattern@lokr": ([], "{linear_qkv: 4}", "lora"),
    "adapter.init_weights@lokr": ([], "lycoris", "lora"),
    "adapter.modules_to_save@lokr": ([], "[final_layernorm]", "lora"),
    "adapter.seed@lokr": ([], "5", "lora"),
    "adapter.target_modules@ia3": ([], "[linear_qkv, linear_fc2, linear_proj]", "lora"),
    "adapter.feedforward_modules@ia3": ([], "[]", "lora"),
    "adapter.exclude_modules@ia3": ([], "[linear_proj]", "lora"),
    "adapter.fused_parts@ia3": ([], "{linear_qkv: [v]}", "lora"),
    "adapter.init_ia3_weights@ia3": ([], "false", "lora"),
    "adapter.fan_in_fan_out@ia3": ([], "true", "lora"),
    "adapter.modules_to_save@ia3": ([], "[final_layernorm]", "lora"),
    "adapter.seed@ia3": ([], "5", "lora"),
    "adapter.num_virtual_tokens@prompt_tuning": ([], "4", "lora"),
    "adapter.prompt_tuning_init@prompt_tuning": (["adapter.init_token_ids=[1, 2]"], "TEXT", "lora"),
    "adapter.prompt_tuning_init_text@prompt_tuning": (["adapter.prompt_tuning_init=TEXT",
                                                       "adapter.init_token_ids=[1, 2]"], "Classify:", "lora"),
    "adapter.tokenizer_name_or_path@prompt_tuning": ([], "{hf}", "lora"),
    "adapter.tokenizer_kwargs@prompt_tuning": ([], "{use_fast: false}", "lora"),
    "adapter.init_token_ids@prompt_tuning": (["adapter.prompt_tuning_init=TEXT", "adapter.init_token_ids=[3]"],
                                             "[1, 2]", "lora"),
    "adapter.seed@prompt_tuning": ([], "5", "lora"),
    "adapter.num_virtual_tokens@p_tuning": (["adapter.encoder_hidden_size=16"], "4", "lora"),
    "adapter.encoder_hidden_size@p_tuning": (["adapter.encoder_hidden_size=16"], "32", "lora"),
    "adapter.encoder_reparameterization_type@p_tuning": (["adapter.encoder_hidden_size=16"], "LSTM", "lora"),
    "adapter.encoder_num_layers@p_tuning": (["adapter.encoder_hidden_size=16"], "3", "lora"),
    "adapter.encoder_dropout@p_tuning": (["adapter.encoder_hidden_size=16"], "0.1", "lora"),
    "adapter.seed@p_tuning": (["adapter.encoder_hidden_size=16"], "5", "lora"),
    "adapter.num_virtual_tokens@prefix_tuning": ([], "4", "lora"),
    "adapter.prefix_projection@prefix_tuning": ([], "true", "lora"),
    "adapter.encoder_hidden_size@prefix_tuning": (["adapter.prefix_projection=true"], "32", "lora"),
    "adapter.init_weights@prefix_tuning": ([], "zero", "lora"),
    "adapter.seed@prefix_tuning": ([], "5", "lora"),
    **{f"adapter.{key}@{kind}": ([], value, "lora") for kind in ("prompt_tuning", "p_tuning", "prefix_tuning")
       for key, value in (("token_dim", "64"), ("num_transformer_submodules", "2"), ("num_attention_heads", "2"),
                          ("num_layers", "3"), ("inference_mode", "true"), ("peft_type", "LORA"),
                          ("task_type", "SEQ_CLS"))},
    "eva.rho": (EVA_ON, "1.5", "lora"),
    "eva.tau": (EVA_ON, "0.9", "lora"),
    "eva.use_label_mask": (EVA_ON, "false", "lora"),
    "eva.label_mask_value": (EVA_ON, "-1", "lora"),
    "eva.whiten": (EVA_ON, "true", "lora"),
    "eva.adjust_scaling_factors": (EVA_ON, "false", "lora"),
    "eva.max_steps": (EVA_ON, "4", "lora"),
    "eva.sketch_multiple": (EVA_ON, "3.0", "lora"),
    "data.paths": ([], "[{text}]", "samples"),
    "data.seq_len": ([], "32", "samples"),
    "data.tokenizer": (["model.hf_checkpoint={hf}", "data.tokenizer=byte"], "hf", "tokenizer"),
    "optim.lr": ([], "0.1", "loop"),
    "optim.schedule": ([], "cosine", "loop"),
    "optim.warmup_steps": ([], "3", "loop"),
    "optim.weight_decay": ([], "0.1", "engine"),
    "optim.grad_clip": ([], "1.0", "engine"),
    "optim.micro_batch": ([], "2", "layout"),
    "optim.global_batch": ([], "32", "layout"),
    "optim.steps": ([], "10", "loop"),
    "optim.nonfinite": ([], "skip", "loop"),
    "deepspeed": ([], str(REPO / "configs" / "deepspeed" / "zero1.json"), "engine"),
    "checkpoint.directory": ([], "{tmp}/ck", "loop"),
    "checkpoint.save_every": (["checkpoint.directory={tmp}/ck"], "5", "loop"),
    "checkpoint.keep_last": (["checkpoint.directory={tmp}/ck"], "5", "loop"),
    "export.peft_dir": ([], "", RUN),
    "export.verify_with_peft": ([], "", RUN),
    "seed": ([], "1", "order"),
    "logging.every": (["logging.metrics_jsonl={tmp}/m.jsonl"], "5", "loop"),
    "logging.metrics_jsonl": ([], "{tmp}/m.jsonl", "loop"),
}
REFUSED = {"parallel.data"} | ({"moe.dispatcher"} if not torch.cuda.is_available() else set()) | (
    {"moe.grouped_gemm"} if not (torch.cuda.is_available() and importlib.util.find_spec("grouped_gemm")) else set())
"""Keys whose changed value is observable only as a refusal (moe.dispatcher=alltoall, moe.grouped_gemm:
on the CPU)."""
REFUSED_AT_LOAD = {  # PEFT fields whose only supported value is the default: another is refused, naming it
    "adapter.use_effective_conv2d@lokr", "adapter.use_effective_conv2d@loha", "adapter.conv_layout",  # nn.Conv2d only: a GPT run has none
    "adapter.fan_in_fan_out@ia3",
    # set by the model or fixed (the export writes them): a run config may not set them
    *(f"adapter.{key}@{kind}" for kind in ("prompt_tuning", "p_tuning", "prefix_tuning")
      for key in ("token_dim", "num_transformer_submodules", "num_attention_heads", "num_layers", "inference_mode",
                  "peft_type", "task_type")),
}


def run_config_keys() -> set[str]:
    """Every dotted key of RunConfig: a section's fields, or a top-level scalar."""
    keys: set[str] = set()
    hints = typing.get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        if f.name == "adapter":  # one config per adapter.kind
            keys |= {"adapter.kind"} | {f"adapter.{g.name}" for g in dataclasses.fields(LoraConfig)}
            keys |= {f"adapter.{g.name}@{kind}" for kind, cls in ADAPTER_KINDS.items() if kind != "lora"
                     for g in dataclasses.fields(cls)}
            continue
        section = next((a for a in (hints[f.name], *typing.get_args(hints[f.name])) if dataclasses.is_dataclass(a)),
                       None)
        keys |= {f"{f.name}.{g.name}" for g in dataclasses.fields(section)} if section else {f.name}
    return keys


def _split_kind(key: str) -> tuple[str, list[str]]:
    """`adapter.alpha@loha` -> ("adapter.alpha", ["adapter.kind=loha"])."""
    key, _, kind = key.partition("@")
    return key, [f"adapter.kind={kind}"] if kind else []


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, str]:
    """{hf}: a Llama config.json (another shape than the defaults); {text}: a small corpus; {tmp}."""
    from transformers import LlamaConfig

    tmp = tmp_path_factory.mktemp("fields")
    LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128).save_pretrained(tmp / "hf")
    (tmp / "text.txt").write_text("a small corpus, other than the shipped one. " * 40)
    return {"hf": str(tmp / "hf"), "text": str(tmp / "text.txt"), "tmp": str(tmp)}


def _load(overrides: list[str], places: dict[str, str]) -> RunConfig:
    for name, value in places.items():
        overrides = [o.replace("{" + name + "}", value) for o in overrides]
    return load_run_config(None, overrides)


def _digest(tensor) -> tuple:
    return tuple(tensor.shape), hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


def observe(target: str, config: RunConfig):
    """What the run builds from `config` for `target` (nothing is trained), or the refusal."""
    try:
        validate_run_config(config)
        layout = check_parallel_layout(WORLD, config)
    except ValueError as exc:
        return ("refused", str(exc))
    if target == "layout":
        return layout
    if target == "lora":
        return runner.adapter_config(config, None)
    if target == "gpt":
        return runner.gpt_settings(config, layout.tensor)
    if target == "loop":
        return runner.loop_settings(config, layout, 257, "torch")
    if target == "engine":
        return engine_arguments(config, layout)
    if target == "tokenizer":
        return runner.tokenizer_kind(config)
    samples = runner.build_samples(config)[0]
    if target == "samples":
        return _digest(samples)
    assert target == "order", target
    return [_digest(mb["input_ids"]) for mb in runner.batch_sampler(config, layout, samples, 0).next_step()]


def test_every_key_has_a_case():
    keys = run_config_keys()
    assert not keys - set(CASES), f"run-config keys without a case here: {sorted(keys - set(CASES))}"
    assert not set(CASES) - keys, f"cases for keys that no longer exist: {sorted(set(CASES) - keys)}"


@pytest.mark.parametrize("key", sorted(k for k, case in CASES.items() if case[2] != RUN))
def test_changing_a_key_changes_its_target(key, places):
    context, value, target = CASES[key]
    dotted, kind = _split_kind(key)
    context = kind + context
    if key in REFUSED_AT_LOAD:
        with pytest.raises(ValueError, match=dotted.split(".")[1]):
            _load(context + [f"{dotted}={value}"], places)
        return
    base, changed = _load(context, places), _load(context + [f"{dotted}={value}"], places)
    assert base != changed, f"the override {key}={value} changed nothing in the RunConfig"
    before, after = observe(target, base), observe(target, changed)
    assert not _refused(before), before
    assert _refused(after) == (key in REFUSED), after
    assert before != after, f"{key}={value} does not reach the {target}"


def _refused(observed) -> bool:
    return isinstance(observed, tuple) and observed[0] == "refused"


def test_run_observed_keys_are_run():
    from tests.integration.test_run_config_in_runs import RUN_KEYS

    assert {k for k, case in CASES.items() if case[2] == RUN} == set(RUN_KEYS)


# ----------------------------------------------------------------------------------------------
# EVA: the eva: section configures it, whatever adapter.init_lora_weights says
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("init", ["eva", "true", "false", "gaussian"])
def test_eva_section_configures_eva_whatever_the_init(init):
    config = load_run_config(None, [f"adapter.init_lora_weights={init}", "eva.max_steps=4", "eva.rho=1.5"])
    lora = runner.adapter_config(config, None)
    assert lora.init_lora_weights == "eva" and lora.eva_config == EvaConfig(max_steps=4, rho=1.5)


def test_demo_config_eva_section_is_used():
    config = load_run_config(REPO / "configs" / "demo.yaml", ["eva.max_steps=4"])
    assert runner.adapter_config(config, None).eva_config.max_steps == 4


def test_inline_eva_config_without_a_section_is_used():
    config = load_run_config(None, ["adapter.init_lora_weights=eva", "adapter.eva_config={max_steps: 3}"])
    validate_run_config(config)
    assert runner.adapter_config(config, None).eva_config == EvaConfig(max_steps=3)


def test_same_inline_eva_config_and_section_agree():
    config = load_run_config(None, ["adapter.init_lora_weights=eva", "adapter.eva_config={max_steps: 3}",
                                    "eva.max_steps=3"])
    validate_run_config(config)
    assert runner.adapter_config(config, None).eva_config == EvaConfig(max_steps=3)


# ----------------------------------------------------------------------------------------------
# Keys that nothing would read are refused, naming them
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,named", [
    (["adapter.init_lora_weights=eva", "adapter.eva_config={max_steps: 3}", "eva.max_steps=4"],
     r"adapter\.eva_config and eva"),
    (["adapter.eva_config={max_steps: 3}"], r"adapter\.eva_config is ignored"),
    (["model.hf_checkpoint={hf}", "model.num_layers=4"], r"model\.num_layers"),
    (["model.hf_checkpoint={hf}", "model.init_seed=9"], r"model\.init_seed"),
    (["logging.every=5"], r"logging\.every needs logging\.metrics_jsonl"),
    (["checkpoint.keep_last=5"], r"checkpoint\.keep_last needs checkpoint\.directory"),
])
def test_a_key_that_would_be_ignored_is_refused(overrides, named, places):
    with pytest.raises(ValueError, match=named):
        validate_run_config(_load(overrides, places))


def _saved_checkpoint(tmp_path: Path, lora: LoraConfig) -> Path:
    data = dict(lora.to_dict(), adapter_name="default", tp_size=1, pp_size=1)
    if data["eva_config"] is None:
        data.pop("eva_config")
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    return tmp_path


def test_resume_takes_the_checkpoints_adapter_and_refuses_another(tmp_path):
    config = load_run_config(None, ["adapter.r=4", "adapter.lora_dropout=0.1"])
    ckpt = _saved_checkpoint(tmp_path, config.adapter)
    assert runner.adapter_config(config, ckpt).r == 4
    other = load_run_config(None, ["adapter.r=4", "adapter.lora_dropout=0.2"])
    with pytest.raises(ValueError, match=r"adapter\.lora_dropout=0\.1, the run config has 0\.2"):
        runner.adapter_config(other, ckpt)


def test_resume_after_eva_keeps_evas_ranks(tmp_path):
    config = load_run_config(None, ["adapter.r=4", "eva.max_steps=3"])
    after_eva = runner.adapter_config(config, None).replace(  # eva/state.py: ranks, and the layers kept
        rank_pattern={"linear_qkv": 6}, target_modules=("decoder.layers.0.self_attention.linear_qkv",))
    restored = runner.adapter_config(config, _saved_checkpoint(tmp_path, after_eva))
    assert restored.rank_pattern == {"linear_qkv": 6} and restored.init_lora_weights is True
    assert restored.target_modules == after_eva.target_modules
    with pytest.raises(ValueError, match=r"adapter\.r=4, the run config has 8"):
        runner.adapter_config(load_run_config(None, ["eva.max_steps=3"]), tmp_path)
