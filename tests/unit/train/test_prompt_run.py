"""The run config's prompt-learning kinds (train/prompt_run.py): `adapter.kind: prompt_tuning |
p_tuning` picks PEFT's config, keys a run does not take are refused naming the kind and field, EVA
and DeepSpeed with PP are refused, the sequence-length rule under SP names its three numbers, a resumed run
rebuilds the checkpoint's prompt adapter, and the run's loss targets give transformers' own
causal-LM loss of PEFT's prompted forward (the oracle: transformers.loss.loss_utils.ForCausalLMLoss
on the same logits with PEFT's extended labels)."""
import json

import pytest
import torch

from parallel_adapters.config import PromptEncoderConfig, PromptTuningConfig
from parallel_adapters.train import runner
from parallel_adapters.train.prompt_run import prompted_targets
from parallel_adapters.train.run_config import load_run_config
from parallel_adapters.train.schedule import lm_loss_sum, valid_tokens
from parallel_adapters.train.validate import check_parallel_layout, validate_run_config

P_TUNING = ["adapter.kind=p_tuning", "adapter.encoder_hidden_size=16"]


@pytest.mark.parametrize("overrides,cls", [(["adapter.kind=prompt_tuning", "adapter.num_virtual_tokens=4"],
                                            PromptTuningConfig), (P_TUNING + ["adapter.num_virtual_tokens=4"],
                                                                  PromptEncoderConfig)])
def test_kind_picks_the_prompt_config(overrides, cls):
    config = load_run_config(None, overrides)
    validate_run_config(config)
    assert type(runner.adapter_config(config, None)) is cls and config.adapter.num_virtual_tokens == 4


@pytest.mark.parametrize("overrides,named", [
    (["adapter.kind=prompt_tuning", "adapter.r=4"], r"\['adapter.r'\] are not fields of adapter kind 'prompt_tuning'"),
    (P_TUNING + ["adapter.prompt_tuning_init=TEXT"], r"adapter.prompt_tuning_init'\] .* kind 'p_tuning'"),
    (["adapter.kind=prompt_tuning", "adapter.token_dim=64"],
     r"adapter.token_dim is not a run-config key of adapter kind 'prompt_tuning': the model's hidden size"),
    (P_TUNING + ["adapter.task_type=SEQ_CLS"], r"adapter.task_type is not a run-config key of adapter kind 'p_tuning'"),
    (["adapter.kind=p_tuning"], r"encoder_hidden_size is required"),
])
def test_bad_prompt_fields_are_refused_naming_kind_and_field(overrides, named):
    with pytest.raises(ValueError, match=named):
        load_run_config(None, overrides)


@pytest.mark.parametrize("overrides,named", [
    (["adapter.kind=prompt_tuning", "eva={}"], r"EVA initialises LoRA adapters only; adapter.kind is 'prompt_tuning'"),
    (P_TUNING + ["deepspeed=configs/deepspeed/zero2.json", "parallel.pipeline=2"],
     r"deepspeed with parallel.pipeline=2: adapter.kind='p_tuning' trains under PP with the torch engine only"),
    (["adapter.kind=prompt_tuning", "adapter.num_virtual_tokens=200", "data.seq_len=64"],
     r"adapter.num_virtual_tokens=200 \+ data.seq_len=64 exceeds model.max_position_embeddings=256"),
    (["adapter.kind=prompt_tuning", "adapter.prompt_tuning_init=TEXT", "adapter.prompt_tuning_init_text=hi"],
     r"adapter.prompt_tuning_init=TEXT needs adapter.tokenizer_name_or_path"),
])
def test_prompt_runs_refused_before_any_process_group(overrides, named):
    with pytest.raises(ValueError, match=named):
        validate_run_config(load_run_config(None, overrides))


@pytest.mark.parametrize("overrides", [["parallel.pipeline=2"], ["deepspeed=configs/deepspeed/zero2.json"],
                                       ["deepspeed=configs/deepspeed/zero3.json", "parallel.tensor=2"]])
@pytest.mark.parametrize("kind", [["adapter.kind=prompt_tuning"], P_TUNING + ["adapter.encoder_reparameterization_type=LSTM"]])
def test_prompt_runs_under_pp_or_deepspeed_validate(kind, overrides):
    """PP alone and DeepSpeed alone train a prompt (tests/integration/test_train_prompt_layouts.py)."""
    config = load_run_config(None, kind + overrides)
    validate_run_config(config)
    check_parallel_layout(4, config)


def test_sequence_parallel_needs_virtual_plus_real_tokens_to_divide_by_tp():
    sp = ["parallel.tensor=2", "parallel.sequence_parallel=true", "data.seq_len=32", "adapter.kind=prompt_tuning"]
    with pytest.raises(ValueError, match=r"adapter.num_virtual_tokens=3 \+ data.seq_len=32 = 35 positions must divide "
                                         r"by parallel.tensor=2"):
        check_parallel_layout(2, load_run_config(None, sp + ["adapter.num_virtual_tokens=3"]))
    assert check_parallel_layout(2, load_run_config(None, sp + ["adapter.num_virtual_tokens=4"])).tensor == 2
    odd = ["parallel.tensor=2", "parallel.sequence_parallel=true", "data.seq_len=31"]
    check_parallel_layout(2, load_run_config(None, odd + ["adapter.kind=prompt_tuning", "adapter.num_virtual_tokens=3"]))
    with pytest.raises(ValueError, match=r"data.seq_len=31 must divide by parallel.tensor=2"):  # LoRA: seq_len alone
        check_parallel_layout(2, load_run_config(None, odd))


@pytest.mark.parametrize("overrides,peft_type", [(["adapter.kind=prompt_tuning", "adapter.num_virtual_tokens=5"],
                                                  "PROMPT_TUNING"), (P_TUNING + ["adapter.num_virtual_tokens=5"],
                                                                     "P_TUNING")])
def test_resume_rebuilds_the_checkpoints_prompt_adapter(tmp_path, overrides, peft_type):
    config = load_run_config(None, overrides)
    saved = dict(config.adapter.to_dict(), adapter_name="default", adapter_kind="prompt_tuning", tp_size=2, pp_size=1)
    assert saved["peft_type"] == peft_type
    (tmp_path / "adapter_config.json").write_text(json.dumps(saved))
    assert runner.adapter_config(config, tmp_path) == config.adapter
    assert runner.saved_adapter_config(tmp_path) == config.adapter
    other = load_run_config(None, overrides[:-1] + ["adapter.num_virtual_tokens=6"])
    with pytest.raises(ValueError, match=r"adapter.num_virtual_tokens=5, the run config has 6"):
        runner.adapter_config(other, tmp_path)
    kind = "p_tuning" if peft_type == "PROMPT_TUNING" else "prompt_tuning"
    with pytest.raises(ValueError, match=rf"adapter.kind={kind!r}"):
        runner.adapter_config(load_run_config(None, P_TUNING if kind == "p_tuning" else [f"adapter.kind={kind}"]),
                              tmp_path)


@pytest.mark.parametrize("n", [1, 3])
def test_run_loss_is_transformers_loss_of_peft_prompted_forward(n):
    from transformers.loss.loss_utils import ForCausalLMLoss

    g = torch.Generator().manual_seed(n)
    b, t, vocab = 3, 7, 11
    stream = torch.randint(0, vocab, (b, t + 1), generator=g)
    x, y = stream[:, :-1].clone(), stream[:, 1:].clone()
    y[x == 2] = -100  # the data's mask: the token after an eos (id 2 here) is not predicted
    logits = torch.randn(b, n + t, vocab, generator=g, dtype=torch.float64)
    targets = prompted_targets(x, y, n)
    ours = lm_loss_sum(logits, targets, vocab) / valid_tokens([{"labels": targets}])
    peft_labels = x.masked_fill(torch.cat([torch.zeros(b, 1, dtype=torch.bool), x[:, :-1] == 2], dim=1), -100)
    extended = torch.cat([torch.full((b, n), -100), peft_labels], dim=1)  # PEFT's prompt-learning forward
    expected = ForCausalLMLoss(logits.float(), extended, vocab)
    torch.testing.assert_close(ours.float(), expected, atol=1e-6, rtol=1e-6)
    assert targets.shape == (b, n + t) and (targets[:, :n - 1] == -100).all() and (targets[:, -1] == -100).all()
