"""parallel_adapters.mcore.gpt and .cpu on real gloo ranks (world 2).

Reference: the same GPTSettings at TP=1, PP=1.  The TP=2 model (sequence parallel off and on)
must hold exactly the TP=1 full weights and give the same logits (1e-5 in fp32, 1e-12 in fp64);
the PP=2 model, run through megatron's pipeline schedule with 2 microbatches, must give the PP=1
loss and the PP=1 gradients.  Jobs live in tests/mcore/gpt_jobs.py.
"""
import pytest
import torch

from tests.mcore import gpt_jobs as jobs

VOCAB = 256


def _ids(batch: int, seq: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------- one process

def test_enable_cpu_mode_refuses_when_cuda_is_available(monkeypatch):
    from parallel_adapters.mcore import cpu

    before = torch.cuda.current_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="CUDA is available"):
        cpu.enable_cpu_mode()
    assert torch.cuda.current_device is before


def test_padded_vocab_is_the_same_at_every_tp_size():
    from parallel_adapters.mcore.gpt import GPTSettings, padded_vocab_size

    settings = GPTSettings(vocab_size=250, vocab_pad_multiple=8)
    assert {padded_vocab_size(settings, tp) for tp in (1, 2, 4)} == {256}
    with pytest.raises(ValueError, match="vocab_pad_multiple"):
        padded_vocab_size(GPTSettings(vocab_size=250, vocab_pad_multiple=2), 4)
    with pytest.raises(ValueError, match="num_query_groups"):
        GPTSettings(num_attention_heads=4, num_query_groups=3)


# ---------------------------------------------------------------------------------- CPU mode

def test_cpu_mode_is_idempotent_and_seeds_like_megatron(pool2):
    for out in pool2.run(jobs.cpu_mode_job, 7):
        assert out["enabled"] and out["idempotent"]
        assert out["current_device"] == "cpu"
        assert out["tracker_cls"] == "CpuRNGStatesTracker"
        for name in ("tp", "default", "dp"):  # model-parallel-rng = seed + 2718 + tp_rank
            assert torch.equal(out["draws"][name], out["expected"][name]), name
        assert out["recompute_grad_err"] == 0.0  # checkpoint replays the same dropout mask


def test_build_gpt_requires_parallel_state(pool2):
    for message in pool2.run(jobs.build_without_state_job):
        assert "initialise" in message


# ---------------------------------------------------------------------------------- TP

@pytest.fixture(scope="module")
def tp1_reference(pool2):
    return pool2.run(jobs.logits_job, 1, False, _ids(2))


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["sp-off", "sp-on"])
def test_tp2_logits_and_weights_match_tp1(pool2, tp1_reference, sequence_parallel):
    ref = tp1_reference[0]
    assert torch.equal(ref["logits"], tp1_reference[1]["logits"])  # the two DP replicas agree
    assert ref["logits"].shape == (2, 16, VOCAB)
    for out in pool2.run(jobs.logits_job, 2, sequence_parallel, _ids(2)):
        assert out["vocab_rows"] == ref["vocab_rows"]
        assert out["sp_norm"] is sequence_parallel  # megatron all-reduces these grads over TP
        torch.testing.assert_close(out["logits"], ref["logits"], rtol=0, atol=1e-5)
        assert out["weights"].keys() == ref["weights"].keys()
        for name, full in ref["weights"].items():
            assert torch.equal(out["weights"][name], full), name


def test_tp4_with_fewer_kv_groups_than_ranks_matches_tp1(pool4):
    """num_query_groups=2 < TP=4: each rank holds a contiguous quarter of the qkv rows."""
    ref = pool4.run(jobs.logits_job, 1, False, _ids(2))[0]
    for out in pool4.run(jobs.logits_job, 4, True, _ids(2)):
        torch.testing.assert_close(out["logits"], ref["logits"], rtol=0, atol=1e-5)
        for name, full in ref["weights"].items():
            assert torch.equal(out["weights"][name], full), name


def test_tp2_sequence_parallel_matches_tp1_in_float64(pool2):
    kw = {"params_dtype": torch.float64}
    ref = pool2.run(jobs.logits_job, 1, False, _ids(2), **kw)[0]["logits"]
    assert ref.dtype == torch.float64
    for out in pool2.run(jobs.logits_job, 2, True, _ids(2), **kw):
        torch.testing.assert_close(out["logits"], ref, rtol=0, atol=1e-12)


def test_vocab_padding_is_zero_and_sliced_off(pool2):
    kw = {"vocab_size": 250}  # padded to 256
    ref = pool2.run(jobs.logits_job, 1, False, _ids(2) % 250, **kw)[0]
    for out in pool2.run(jobs.logits_job, 2, False, _ids(2) % 250, **kw):
        assert out["vocab_rows"] == 256 and out["logits"].shape == (2, 16, 250)
        torch.testing.assert_close(out["logits"], ref["logits"], rtol=0, atol=1e-5)
        for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            assert out["weights"][name][250:].abs().sum() == 0
            assert out["weights"][name][:250].abs().min(dim=1).values.gt(0).all()


# ---------------------------------------------------------------------------------- PP

@pytest.fixture(scope="module")
def lm_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (4, 16), generator=g), torch.randint(0, VOCAB, (4, 16), generator=g)


@pytest.fixture(scope="module")
def pp1_reference(pool2, lm_batch):
    out = pool2.run(jobs.pipeline_job, 1, *lm_batch, False)
    assert torch.equal(out[0]["loss"], out[1]["loss"])
    return out[0]


@pytest.mark.parametrize("forward_only", [True, False], ids=["forward", "forward-backward"])
def test_pp2_schedule_matches_pp1(pool2, lm_batch, pp1_reference, forward_only):
    stages = pool2.run(jobs.pipeline_job, 2, *lm_batch, forward_only)
    assert [s["stage"] for s in stages] == [0, 1]
    assert stages[0]["loss"] is None
    torch.testing.assert_close(stages[1]["loss"], pp1_reference["loss"], rtol=0, atol=1e-5)
    if forward_only:
        return
    ref_grads = pp1_reference["grads"]
    seen = set()
    for stage in stages:
        for name, grad in stage["grads"].items():
            torch.testing.assert_close(grad, ref_grads[name], rtol=0, atol=1e-6, msg=name)
            seen.add(name)
    assert seen == set(ref_grads)  # the two stages hold every parameter exactly once


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_pp2_gpt_logits_match_pp1(pool2, tie):
    ref = pool2.run(jobs.pipeline_logits_job, 1, _ids(2), tie_embeddings=tie)[0]
    first, last = pool2.run(jobs.pipeline_logits_job, 2, _ids(2), tie_embeddings=tie)
    assert first is None
    torch.testing.assert_close(last, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_gpt_runs_attention_softmax_in_fp32(pool2, dtype):
    for out in pool2.run(jobs.half_precision_job, dtype, _ids(2)):
        fp16, bf16 = dtype == torch.float16, dtype == torch.bfloat16
        assert out["flags"] == (fp16, bf16, True, True)
        err = (out["half"] - out["fp32"]).abs().max().item()
        assert err < 0.1 * out["fp32"].abs().max().item(), err


def test_recompute_setting_reaches_megatron(pool2):
    counts = {r: pool2.run(jobs.recompute_calls_job, r, _ids(2))[0] for r in (None, "full", "selective")}
    assert counts == {None: 0, "full": 2, "selective": 2}  # one per layer: the layer, or its attention
