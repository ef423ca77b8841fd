"""The tiny Megatron GPT of test_lora_gpt.py (2 layers, grouped-query attention, SwiGLU) with LoKr
on linear_qkv, linear_proj, linear_fc1 and linear_fc2: r=2 with `decompose_both` (every factor a
rank-2 product) except linear_fc1 (rank_pattern 8: w1 and w2 whole, w1 split within each of
[gate; up] at TP=2), every factor random.  Oracle: the same model at TP=1 from the same seed.  TP=2
with sequence parallelism off and on must give the same losses over five AdamW steps and the same
consolidated first-step gradients and the consolidated adapter tensors after the five steps
(fp32, 1e-5); the adapted model must issue no more collectives
than the frozen base with only the word embedding trainable, and finalize_grads one all-reduce.
"""
import pytest
import torch

from tests.mcore.test_ia3_loha_gpt import _consolidated_grads, assert_weights_match
from tests.mcore.test_lora_gpt import TARGETS, _batch, _setup, adamw_steps, counted_step

STEPS = 5


def _config():
    from parallel_adapters import LoKrConfig

    return LoKrConfig(r=2, alpha=4, decompose_both=True, rank_pattern={"linear_fc1": 8}, target_modules=TARGETS,
                      init_weights=False, seed=3)


def training_job(tp, sp):
    base, _, groups, get_adapter_model = _setup(tp, sp)
    adapter = get_adapter_model(base, _config())
    losses, first_grads = adamw_steps(adapter, lambda: _consolidated_grads(adapter, groups))
    return losses, first_grads, _consolidated_grads(adapter, groups, weights=True)


@pytest.fixture(scope="module")
def tp1_reference(pool2):
    return pool2.run(training_job, 1, False)[0]


@pytest.mark.parametrize("sp", [False, True])
def test_tp2_matches_tp1_losses_gradients_and_weights(pool2, tp1_reference, sp):
    ref_losses, ref_grads, ref_weights = tp1_reference
    assert ref_losses[-1] < ref_losses[0] - 1e-3, "the reference must actually train"
    fc1 = {n.rsplit(".", 1)[-1] for n in ref_grads if "linear_fc1" in n}
    assert fc1 == {"lokr_w1", "lokr_w2"} and len(ref_grads) == 2 * (3 * 4 + 2)
    for losses, grads, weights in pool2.run(training_job, 2, sp):
        assert losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-5)
        assert grads.keys() == ref_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)
            assert grad.abs().max() > 0, f"{name}: zero gradient makes the comparison vacuous"
        assert_weights_match(weights, ref_weights)


def collectives_job(sp, frozen_base):
    base, _, _, get_adapter_model = _setup(2, sp)
    input_ids, labels = _batch()
    if frozen_base:
        step, finalize_calls = counted_step(base, None, input_ids, labels, frozen_base=True)
    else:
        adapter = get_adapter_model(base, _config())
        step, finalize_calls = counted_step(adapter.model, adapter.finalize_grads, input_ids, labels)
    return dict(step.calls), finalize_calls


@pytest.mark.parametrize("sp", [False, True])
def test_lokr_adds_no_collective(pool2, sp):
    base_calls, _ = pool2.run(collectives_job, sp, True)[0]
    assert sum(base_calls.values()) > 0
    calls, finalize_calls = pool2.run(collectives_job, sp, False)[0]
    for op, n in calls.items():
        assert n <= base_calls.get(op, 0), f"{op}: adapted {n} > frozen base {base_calls.get(op, 0)}"
    assert finalize_calls == {"all_reduce": 1}, finalize_calls
