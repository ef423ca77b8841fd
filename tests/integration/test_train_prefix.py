"""`train` / `evaluate` with prefix tuning (adapter.kind prefix_tuning).

- configs/tiny_prefix_tuning.yaml (a GPT built here, TP=2 + SP, PEFT's prefix_projection MLP): 2
  steps, exported and verified by the run itself (PEFT on the exported HF base reproduces the
  run's logits, <= 1e-4), then resumed for a third step.
- the per-layer table on a tiny HF Llama at TP=2 + SP: 2 steps + resumed 2 steps bit-exact with
  4 (losses and every rank's shards); step 3's loss equals the cross entropy of PeftModel's logits
  (the step-2 checkpoint exported) against the run's labels (the base's causal-LM loss: nothing is
  prepended); `evaluate`'s logits ([len_i, vocab]) are PeftModel's within 1e-4.
- run-config refusals name the field.
"""
from __future__ import annotations

import json

import pytest
import torch

from tests.helpers.tiny_llama import make_tiny_llama
from tests.integration.test_train_prompt import SEQUENCES, _global_batch, _peft, evaluate_job
from tests.integration.train_jobs import REPO, ZERO, train_job

RUN = ["parallel.tensor=2", "parallel.sequence_parallel=true", "optim.steps=4", "data.tokenizer=byte",
       "optim.lr=0.05", "adapter.kind=prefix_tuning", "adapter.num_virtual_tokens=3"]


def test_tiny_prefix_config_trains_exports_and_resumes(pool2, tmp_path):
    from tests.integration.test_train_kinds import kind_run_job

    path = str(REPO / "configs" / "tiny_prefix_tuning.yaml")
    run = ["optim.steps=2", "optim.warmup_steps=0", "optim.micro_batch=2", "checkpoint.save_every=2",
           f"checkpoint.directory={tmp_path}/ck", f"export.peft_dir={tmp_path}/peft", "logging.metrics_jsonl=null"]
    for r in pool2.run(kind_run_job, path, run, False):
        assert r["final_step"] == 2 and r["peft_diff"] is not None and r["peft_diff"] <= 1e-4, r["peft_diff"]
    assert json.loads((tmp_path / "ck" / "step-000002" / "adapter_config.json").read_text())["adapter_kind"] == \
        "prefix_tuning"
    exported = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert exported["peft_type"] == "PREFIX_TUNING" and exported["prefix_projection"] is True
    more = pool2.run(kind_run_job, path, [*run, "optim.steps=3", "export.peft_dir=null",
                                          "export.verify_with_peft=false"], True)
    assert [(r["start_step"], r["final_step"]) for r in more] == [(2, 3)] * 2


def test_prefix_train_resume_loss_and_evaluate_match_peft(pool2, tmp_path):
    from safetensors.torch import load_file

    from parallel_adapters.checkpoint.export import export_peft_from_checkpoint

    hf = make_tiny_llama(tmp_path / "hf", vocab_size=257)
    run = [*RUN, f"model.hf_checkpoint={hf}"]
    saving = [f"checkpoint.directory={tmp_path}/ck", "checkpoint.save_every=2"]
    straight = pool2.run(train_job, run)
    pool2.run(train_job, run + saving, None, "auto", 2)
    second = pool2.run(train_job, run + saving)  # resumes from `latest` by itself
    assert second[0]["start_step"] == 2
    for a, c in zip(straight, second):
        assert a["losses"][2:] == c["losses"]
        assert a["shards"].keys() == c["shards"].keys() and a["shards"]
        assert all(torch.equal(a["shards"][n][0], c["shards"][n][0]) for n in a["shards"])
    assert sorted(straight[0]["shards"]) == ["prefix_tuning.default.layers.0.weight",
                                             "prefix_tuning.default.layers.1.weight"]

    export_peft_from_checkpoint(tmp_path / "ck" / "step-000002", tmp_path / "peft2", hf)
    x, y = _global_batch(run, 3)
    with torch.no_grad():  # the run's targets are the data's labels (position p predicts y[p]), on PEFT's logits
        logits = _peft(hf, tmp_path / "peft2")(input_ids=x).logits
        peft_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
    assert abs(peft_loss.item() - straight[0]["losses"][2]) < 1e-5, (peft_loss.item(), straight[0]["losses"][2])

    export_peft_from_checkpoint(second[0]["last_checkpoint"], tmp_path / "peft", hf)
    (tmp_path / "ids.txt").write_text("\n".join(" ".join(map(str, s)) for s in SEQUENCES) + "\n")
    pool2.run(evaluate_job, run, second[0]["last_checkpoint"], str(tmp_path / "ids.txt"),
              str(tmp_path / "logits.safetensors"))
    written, model = load_file(tmp_path / "logits.safetensors"), _peft(hf, tmp_path / "peft")
    for i, seq in enumerate(SEQUENCES):
        with torch.no_grad():
            expected = model(input_ids=torch.tensor([seq])).logits[0]
        assert written[f"logits.{i}"].shape == (len(seq), 257)
        torch.testing.assert_close(written[f"logits.{i}"], expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("overrides,message", [
    (["adapter.token_dim=24"], "adapter.token_dim is not a run-config key of adapter kind 'prefix_tuning'"),
    (["parallel.pipeline=2", f"deepspeed={ZERO[1]}"], "deepspeed.*parallel.pipeline=2"),
])
def test_run_config_refusals_name_the_field(overrides, message):
    from parallel_adapters.train.prefix_run import validate_prefix_run
    from parallel_adapters.train.run_config import load_run_config
    from parallel_adapters.train.validate import validate_run_config

    path = str(REPO / "configs" / "tiny_prefix_tuning.yaml")
    with pytest.raises(ValueError, match=message):
        validate_run_config(load_run_config(path, overrides))
    if len(overrides) > 1:  # refused by the prefix run's own check too, whichever runs first
        with pytest.raises(ValueError, match=r"deepspeed with parallel.pipeline=2: adapter.kind='prefix_tuning'"):
            validate_prefix_run(load_run_config(path, overrides))


def test_sequence_parallel_split_is_the_base_models():
    """Nothing is prepended: under SP data.seq_len alone must divide by parallel.tensor (an odd
    number of virtual tokens does not matter), refused before any process group otherwise."""
    from parallel_adapters.train.run_config import load_run_config
    from parallel_adapters.train.validate import check_parallel_layout

    path = str(REPO / "configs" / "tiny_prefix_tuning.yaml")
    sp = ["parallel.tensor=2", "parallel.sequence_parallel=true", "adapter.num_virtual_tokens=3"]
    assert check_parallel_layout(2, load_run_config(path, sp + ["data.seq_len=32"])).tensor == 2
    with pytest.raises(ValueError, match=r"data.seq_len=31 must divide by parallel.tensor=2"):
        check_parallel_layout(2, load_run_config(path, sp + ["data.seq_len=31"]))
