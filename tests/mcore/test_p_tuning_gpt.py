"""P-tuning (PEFT's P_TUNING, PromptEncoderConfig) on a Megatron GPT imported from a tiny HF Llama:
the prompt encoder (MLP or bidirectional LSTM + MLP) runs on the first stage, replicated over TP.

Oracle: PEFT's own PromptEncoderConfig model on the same transformers Llama with the same encoder
values: logits over all n + T positions, the loss (labels extended with -100) and every encoder
tensor's gradient, fp32 within 1e-5 (absolute), at TP=1, TP=2 without and with sequence parallelism
(where each rank uses only its chunk's rows and finalize_grads sums the encoder's partial
gradients) and PP=2 (the encoder on the first stage, the logits and loss on the last).
save_pretrained / from_pretrained exchange directories with PEFT's own, both ways (logits, 1e-5).
"""
import pytest
import torch

from tests.helpers.tiny_llama import make_tiny_llama, sample_ids
from tests.mcore import prompt_jobs
from tests.mcore.prompt_jobs import N_VIRTUAL

IDS = sample_ids(batch=2, seq=12)
LABELS = IDS.clone()
LABELS[1, :4] = -100
SHORT = IDS[:, :3]  # n + 3 = 8 positions: under SP at TP=2 rank 0 holds 4 virtual rows, rank 1 the fifth
ENCODERS = {"mlp": {"encoder_reparameterization_type": "MLP", "encoder_hidden_size": 16},
            "lstm": {"encoder_reparameterization_type": "LSTM", "encoder_hidden_size": 8, "encoder_num_layers": 2}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("hf") / "tiny")


@pytest.fixture(scope="module", params=list(ENCODERS))
def peft_reference(request, tiny):
    from peft import PromptEncoderConfig as PeftPromptEncoderConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    fields = ENCODERS[request.param]
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    torch.manual_seed(7)
    peft_model = get_peft_model(model, PeftPromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL,
                                                               **fields))
    encoder = peft_model.prompt_encoder["default"]
    with torch.no_grad():
        for param in encoder.parameters():  # larger than the default init, so every tensor moves the logits
            param.mul_(3.0)
    state = {n: t.detach().clone() for n, t in encoder.state_dict().items()}
    runs = {}
    for ids in (IDS, SHORT):
        peft_model.zero_grad()
        out = peft_model(input_ids=ids, labels=LABELS[:, :ids.shape[1]])
        out.loss.backward()
        runs[ids.shape[1]] = {"logits": out.logits.detach(), "loss": out.loss.detach(),
                              "grads": {n: p.grad.clone() for n, p in encoder.named_parameters()}}
    return {"fields": fields, "state": state, "runs": runs}


@pytest.mark.parametrize("tp,sp,seq,pp", [(1, False, 12, 1), (2, False, 12, 1), (2, True, 12, 1), (2, True, 3, 1),
                                         (1, False, 12, 2)])
def test_logits_loss_and_encoder_gradients_match_peft(pool2, tiny, peft_reference, tp, sp, seq, pp):
    ref = peft_reference["runs"][seq]
    assert ref["logits"].shape == (2, N_VIRTUAL + seq, 101)
    results = pool2.run(prompt_jobs.p_tuning_job, str(tiny), tp, sp, IDS[:, :seq], LABELS[:, :seq],
                        peft_reference["fields"], peft_reference["state"], pp)
    assert any(r["loss"] is not None for r in results)
    for r in results:
        if r["loss"] is not None:  # the last stage
            torch.testing.assert_close(r["logits"], ref["logits"], atol=1e-5, rtol=0)
            torch.testing.assert_close(r["loss"], ref["loss"], atol=1e-5, rtol=0)
        if r["pp_rank"] > 0:  # the encoder lives on the first stage only
            assert r["grads"] == {} and r["trainable"] == [] and r["state"] == []
            continue
        assert sorted(r["grads"]) == sorted(ref["grads"])
        for name, grad in ref["grads"].items():
            assert grad.abs().max() > 1e-6, name
            torch.testing.assert_close(r["grads"][name], grad, atol=1e-5, rtol=0, msg=name)
        assert len(r["trainable"]) == len(ref["grads"])
        assert r["state"] == sorted(f"prompt_tuning.prompt_embeddings.default.{n}" for n in ref["grads"])


@pytest.mark.parametrize("encoder", list(ENCODERS))
def test_encoder_adds_no_collective(pool2, tiny, encoder):
    """TP=2 + SP: the encoder runs replicated on every rank (no collective per micro-batch beyond the
    frozen base's with its embedding trainable); finalize_grads sums its partials in one all-reduce."""
    base_calls, _ = pool2.run(prompt_jobs.collectives_job, str(tiny), True, "frozen_base", IDS, LABELS)[0]
    ours_calls, finalize_calls = pool2.run(prompt_jobs.collectives_job, str(tiny), True, "prompt", IDS, LABELS,
                                           ENCODERS[encoder])[0]
    assert sum(base_calls.values()) > 0
    for op, n in ours_calls.items():
        assert n <= base_calls.get(op, 0), f"{op}: P-tuning {n} > frozen base {base_calls.get(op, 0)}"
    assert finalize_calls == {"all_reduce": 1}


def test_encoder_dropout_under_tp_is_refused(pool2, tiny):
    with pytest.raises(Exception, match="encoder_dropout > 0 with tensor parallelism"):
        pool2.run(prompt_jobs.p_tuning_job, str(tiny), 2, False, IDS, LABELS,
                  {**ENCODERS["lstm"], "encoder_dropout": 0.1}, {})


def test_peft_loads_the_export_and_reproduces_the_megatron_logits(pool2, tiny, peft_reference, tmp_path):
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from parallel_adapters.checkpoint.export import export_peft_from_checkpoint

    fields = peft_reference["fields"]
    logits = pool2.run(prompt_jobs.p_tuning_save_job, str(tiny), str(tmp_path / "ckpt"), IDS, fields,
                       peft_reference["state"])[0]
    torch.testing.assert_close(logits, peft_reference["runs"][12]["logits"], atol=1e-5, rtol=0)
    out = export_peft_from_checkpoint(tmp_path / "ckpt", tmp_path / "peft", tiny)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "P_TUNING" and config["token_dim"] == 48 and config["num_layers"] == 2
    assert {k: config[k] for k in fields} == fields and "prompt_tuning_init" not in config
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(model, out).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=IDS).logits.float(), logits, atol=1e-4, rtol=0)


def test_save_pretrained_and_from_pretrained_speak_peft(pool2, tiny, peft_reference, tmp_path):
    """PEFT's save_pretrained directory (the encoder's output as `prompt_embeddings`) loads into
    Megatron at TP=1 and TP=2 + SP with PEFT's logits: frozen, as the table PEFT's inference mode
    prepends (a trainable load is refused, naming why, as PEFT refuses it).  Ours (TP=1, the rows
    our encoder computes) loads into PEFT's from_pretrained with our logits."""
    import json

    from peft import PeftModel
    from peft import PromptEncoderConfig as PeftPromptEncoderConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    fields, state = peft_reference["fields"], peft_reference["state"]
    hf = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    written = get_peft_model(hf, PeftPromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL, **fields))
    with torch.no_grad():
        written.prompt_encoder["default"].load_state_dict({k: v.flip(0) * 0.7 for k, v in state.items()})
        expected = written(input_ids=IDS).logits.float()
    written.save_pretrained(tmp_path / "by_peft")
    for tp, sp, out in ((1, False, str(tmp_path / "ours")), (2, True, None)):
        for r in pool2.run(prompt_jobs.p_tuning_pretrained_job, str(tiny), tp, sp, out, str(tmp_path / "by_peft"),
                           IDS, fields, state):
            torch.testing.assert_close(r["loaded"], expected, atol=1e-5, rtol=0)  # PEFT's files into Megatron
            assert r["trainable"] == 0 and r["config"] == "PromptTuningConfig"
            assert "holds the encoder's output" in r["trainable_load"]
            if out is None:
                continue
            torch.testing.assert_close(r["saved"], peft_reference["runs"][12]["logits"], atol=1e-5, rtol=0)
            config = json.loads((tmp_path / "ours" / "rank0" / "adapter_config.json").read_text())
            assert config["peft_type"] == "P_TUNING" and {k: config[k] for k in fields} == fields
            fresh = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
            peft_model = PeftModel.from_pretrained(fresh, r["dir"]).eval()  # ours into PEFT
            assert not hasattr(peft_model.prompt_encoder["default"], "mlp_head")  # inference mode: the table
            with torch.no_grad():
                ours = peft_model(input_ids=IDS).logits.float()
            assert (ours - expected).abs().max() > 1e-2  # the two directories hold different prompts
            torch.testing.assert_close(ours, r["saved"], atol=1e-5, rtol=0)
