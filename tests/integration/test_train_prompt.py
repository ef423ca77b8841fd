"""`train` with prompt learning at TP=2 with sequence parallelism (prompt tuning, and P-tuning with
its MLP encoder) on a tiny HF Llama (byte tokenizer, vocab 257): sharded checkpoint -> bit-exact
resume (2 steps + resume 2 steps == 4 steps) -> PEFT export -> `evaluate`.

Oracles: PEFT + transformers on the HF base
- reproduce the run's logits (the run's own export.verify_with_peft, <= 1e-4);
- reproduce `evaluate`'s logits (n + T rows, virtual positions first, as PeftModel's) within 1e-4
  on sequences whose n + T does not divide by TP (gpt_logits pads under SP);
- give the run's loss: the loss of step 3 of the uninterrupted run equals PEFT's loss
  (`PeftModel(input_ids=x, labels=u).loss`, train/prompt_run.prompted_targets says u) on that
  step's global batch with the step-2 checkpoint exported.
"""
from __future__ import annotations

import pytest
import torch

from tests.helpers.tiny_llama import make_tiny_llama
from tests.integration.train_jobs import train_job

RUN = ["parallel.tensor=2", "parallel.sequence_parallel=true", "optim.steps=4", "data.tokenizer=byte",
       "optim.lr=0.05"]
KINDS = {
    "prompt_tuning": ["adapter.kind=prompt_tuning", "adapter.num_virtual_tokens=4"],
    "p_tuning": ["adapter.kind=p_tuning", "adapter.num_virtual_tokens=6", "adapter.encoder_hidden_size=16"],
}
SEQUENCES = [[72, 101, 108, 108, 111, 32, 119, 111, 114], [1, 5, 9, 200, 256, 3, 3, 40, 41, 42, 43, 44, 45]]


def evaluate_job(overrides: list[str], checkpoint: str, tokens: str, out: str) -> float | None:
    from tests.integration.train_jobs import _quiet, prompt_base

    _quiet()
    from parallel_adapters.train.evaluate import run_evaluation
    from parallel_adapters.train.run_config import load_run_config

    return run_evaluation(load_run_config(None, prompt_base(overrides) + overrides), checkpoint, tokens, out)


def _peft(hf, peft_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32), peft_dir).eval()


def _global_batch(overrides: list[str], step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) of the run's global batch at `step` (1-based), as the TP=2 run draws it."""
    from parallel_adapters.train import runner
    from parallel_adapters.train.run_config import load_run_config
    from parallel_adapters.train.validate import check_parallel_layout
    from tests.integration.train_jobs import prompt_base

    config = load_run_config(None, prompt_base(overrides) + overrides)
    layout = check_parallel_layout(2, config)
    sampler = runner.batch_sampler(config, layout, runner.build_samples(config)[0], 0)
    for _ in range(step):
        batches = sampler.next_step()
    return torch.cat([b["input_ids"] for b in batches]), torch.cat([b["labels"] for b in batches])


@pytest.mark.parametrize("kind", list(KINDS))
def test_prompt_train_resume_export_evaluate(pool2, tmp_path, kind):
    from parallel_adapters.checkpoint.export import export_peft_from_checkpoint
    from safetensors.torch import load_file

    hf = make_tiny_llama(tmp_path / "hf", vocab_size=257)
    run = [*RUN, f"model.hf_checkpoint={hf}", *KINDS[kind]]
    saving = [f"checkpoint.directory={tmp_path}/ck", "checkpoint.save_every=2"]
    export = [f"export.peft_dir={tmp_path}/peft", "export.verify_with_peft=true"]
    straight = pool2.run(train_job, run)
    first = pool2.run(train_job, run + saving, None, "auto", 2)
    second = pool2.run(train_job, run + saving + export)  # resumes from `latest` by itself
    assert second[0]["start_step"] == 2
    for a, b, c in zip(straight, first, second):
        assert b["losses"] + c["losses"] == a["losses"]
        assert a["shards"].keys() == c["shards"].keys() and a["shards"]
        assert all(torch.equal(a["shards"][n][0], c["shards"][n][0]) for n in a["shards"])
    assert all(n.startswith("prompt_tuning.prompt_embeddings.") for n in straight[0]["shards"])
    assert second[0]["peft_max_logit_diff"] is not None and second[0]["peft_max_logit_diff"] <= 1e-4

    # the run's loss is PEFT's: step 3's loss from the step-2 weights
    export_peft_from_checkpoint(tmp_path / "ck" / "step-000002", tmp_path / "peft2", hf)
    x, y = _global_batch(run, 3)
    with torch.no_grad():
        peft_loss = _peft(hf, tmp_path / "peft2")(input_ids=x, labels=torch.cat([x[:, :1], y[:, :-1]], dim=1)).loss
    assert abs(peft_loss.item() - straight[0]["losses"][2]) < 1e-5, (peft_loss.item(), straight[0]["losses"][2])

    # evaluate's logits (virtual positions first) are PeftModel's
    (tmp_path / "ids.txt").write_text("\n".join(" ".join(map(str, s)) for s in SEQUENCES) + "\n")
    ppl = pool2.run(evaluate_job, run, second[0]["last_checkpoint"], str(tmp_path / "ids.txt"),
                    str(tmp_path / "logits.safetensors"))
    written = load_file(tmp_path / "logits.safetensors")
    model, n = _peft(hf, tmp_path / "peft"), int(KINDS[kind][1].split("=")[1])
    total, count = 0.0, 0
    for i, seq in enumerate(SEQUENCES):
        ids = torch.tensor([seq])
        with torch.no_grad():
            out = model(input_ids=ids, labels=ids)
        assert written[f"logits.{i}"].shape == (n + len(seq), 257)
        torch.testing.assert_close(written[f"logits.{i}"], out.logits[0], atol=1e-4, rtol=0)
        total, count = total + out.loss.item() * len(seq), count + len(seq)
    assert any(p is not None for p in ppl)
    assert abs(next(p for p in ppl if p is not None) - torch.tensor(total / count).exp().item()) < 1e-4


@pytest.mark.parametrize("kind,peft_type", [("prompt_tuning", "PROMPT_TUNING"), ("p_tuning", "P_TUNING")])
def test_tiny_prompt_config_trains_exports_and_resumes(pool2, tmp_path, kind, peft_type):
    """configs/tiny_{kind}.yaml (a GPT built here, TP=2 SP) for 2 steps, exported and verified by
    the run (PEFT on the exported HF base, <= 1e-4), then resumed for a third step."""
    import json

    from tests.integration.test_train_kinds import kind_run_job
    from tests.integration.train_jobs import REPO

    path = str(REPO / "configs" / f"tiny_{kind}.yaml")
    run = ["optim.steps=2", "optim.warmup_steps=0", "optim.micro_batch=2", "checkpoint.save_every=2",
           f"checkpoint.directory={tmp_path}/ck", f"export.peft_dir={tmp_path}/peft", "logging.metrics_jsonl=null",
           "logging.every=1"]
    results = pool2.run(kind_run_job, path, run, False)
    for r in results:
        assert r["final_step"] == 2 and r["peft_diff"] is not None and r["peft_diff"] <= 1e-4, r["peft_diff"]
    assert json.loads((tmp_path / "ck" / "step-000002" / "adapter_config.json").read_text())["peft_type"] == peft_type
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["peft_type"] == peft_type
    more = pool2.run(kind_run_job, path, [*run, "optim.steps=3", "export.peft_dir=null",
                                          "export.verify_with_peft=false"], True)
    assert [(r["start_step"], r["final_step"]) for r in more] == [(2, 3)] * 2
