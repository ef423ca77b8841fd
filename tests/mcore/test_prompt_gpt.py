"""Prompt tuning on a Megatron GPT imported from a tiny HF Llama (GQA, vocabulary 101: no TP
size divides it, 5 virtual tokens: n + T odd).

Oracle: PEFT's own PromptTuningConfig model on the same transformers Llama with the same virtual
token values: logits over all n + T positions, its loss (labels extended with -100) and the
prompt's gradient, fp32 within 1e-5, at TP=1, TP=2 without and with sequence parallelism, and
PP=2.  Layout parity: five AdamW steps at TP=2 + SP equal TP=1's.  No collective per micro-batch
beyond the frozen base's with its embedding trainable; finalize_grads one all-reduce under SP.
"""
import pytest
import torch

from tests.helpers.tiny_llama import make_tiny_llama, sample_ids
from tests.mcore import prompt_jobs
from tests.mcore.prompt_jobs import N_VIRTUAL

IDS = sample_ids(batch=2, seq=12)
LABELS = IDS.clone()
LABELS[0, :3] = -100  # some ignored labels, as a padded / masked batch has
VALUES = torch.randn(N_VIRTUAL, 48, generator=torch.Generator().manual_seed(11)) * 0.5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("hf") / "tiny")


@pytest.fixture(scope="module")
def peft_reference(tiny):
    from peft import PromptTuningConfig as PeftPromptTuningConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    peft_model = get_peft_model(model, PeftPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL))
    table = peft_model.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        table.copy_(VALUES)
    out = peft_model(input_ids=IDS, labels=LABELS)
    out.loss.backward()
    return {"logits": out.logits.detach(), "loss": out.loss.detach(), "grad": table.grad.clone(),
            "embed": model.get_input_embeddings().weight.detach().clone()}


@pytest.mark.parametrize("tp,pp,sp", [(1, 1, False), (2, 1, False), (2, 1, True), (1, 2, False)])
def test_logits_loss_and_gradient_match_peft(pool2, tiny, peft_reference, tp, pp, sp):
    ref = peft_reference
    assert ref["logits"].shape == (2, N_VIRTUAL + 12, 101)
    results = pool2.run(prompt_jobs.parity_job, str(tiny), tp, pp, sp, IDS, LABELS, VALUES)
    last = [r for r in results if r["loss"] is not None]
    first = [r for r in results if r["grad"] is not None]
    assert last and first
    for r in last:
        torch.testing.assert_close(r["logits"], ref["logits"], atol=1e-5, rtol=0)
        torch.testing.assert_close(r["loss"].float(), ref["loss"], atol=1e-5, rtol=0)
    for r in first:
        assert r["grad"].abs().max() > 1e-4
        torch.testing.assert_close(r["grad"], ref["grad"], atol=1e-5, rtol=0)
        assert r["state"] == ["prompt_tuning.prompt_embeddings.default.weight"]


@pytest.fixture(scope="module")
def tp1_training(pool2, tiny):
    return pool2.run(prompt_jobs.training_job, str(tiny), 1, False, IDS, LABELS)[0]


def test_tp2_sequence_parallel_training_matches_tp1(pool2, tiny, tp1_training):
    ref = tp1_training
    assert ref["trainable"] == 1 and ref["losses"][-1] < ref["losses"][0] - 1e-3, "the reference must train"
    for r in pool2.run(prompt_jobs.training_job, str(tiny), 2, True, IDS, LABELS):
        assert r["losses"] == pytest.approx(ref["losses"], rel=0, abs=1e-5)
        torch.testing.assert_close(r["prompt"], ref["prompt"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("sp", [False, True])
def test_prompt_adds_no_collective(pool2, tiny, sp):
    base_calls, _ = pool2.run(prompt_jobs.collectives_job, str(tiny), sp, "frozen_base", IDS, LABELS)[0]
    ours_calls, finalize_calls = pool2.run(prompt_jobs.collectives_job, str(tiny), sp, "prompt", IDS, LABELS)[0]
    assert sum(base_calls.values()) > 0
    for op, n in ours_calls.items():
        assert n <= base_calls.get(op, 0), f"{op}: prompted {n} > frozen base {base_calls.get(op, 0)}"
    # under SP the prompt's gradient is a per-rank partial (one all-reduce); without SP it is complete
    assert finalize_calls == ({"all_reduce": 1} if sp else {})


def test_inits_read_the_vocab_parallel_table_and_do_not_depend_on_tp(pool2, tiny, peft_reference):
    from parallel_adapters.adapters.prompt import init_token_ids
    from parallel_adapters.config import PromptTuningConfig

    text_ids = [3, 99, 60]  # rows on both TP=2 shards of the padded 104-row table
    one = pool2.run(prompt_jobs.init_job, str(tiny), 1, text_ids)[0]
    two = pool2.run(prompt_jobs.init_job, str(tiny), 2, text_ids)
    embed = peft_reference["embed"]
    for r in two:
        for init in ("RANDOM", "SAMPLE_VOCAB", "TEXT"):
            torch.testing.assert_close(r[init], one[init], atol=0, rtol=0)
        assert "cannot merge prompt adapter(s) ['default']" in r["merge"]
    torch.testing.assert_close(one["TEXT"], embed[[3, 99, 60, 3, 99]])
    sampled = init_token_ids(PromptTuningConfig(num_virtual_tokens=N_VIRTUAL, prompt_tuning_init="SAMPLE_VOCAB",
                                                seed=4), 101)
    torch.testing.assert_close(one["SAMPLE_VOCAB"], embed[sampled])
    assert 0.5 < one["RANDOM"].std().item() < 1.5  # nn.Embedding's N(0, 1)
