"""Per-expert LoRA on megatron's GroupedMLP experts (adapters/hosts/grouped.py) equals it on
SequentialMLP experts with the same weights and adapters, in float64.

GroupedMLP needs the grouped_gemm package and its CUDA `gmm` kernel; the jobs install a stand-in
whose gmm is a plain torch reference (tests/mcore/grouped_gemm_shim.py, test-only).  Both models
at the same layout (EP 1, EP 2, expert-TP 2 on two ranks), the same rows: logits, every adapter
tensor's gradient (by its per-expert global name) agree to 1e-12 and the merged logits to 1e-10;
the adapters change the logits; the GroupedMLP adapter's checkpoint, saved under the same
per-expert names, loads into the SequentialMLP model and gives its logits.  Jobs: tests/mcore/grouped_moe_jobs.py.
"""
import pytest
import torch

from tests.mcore import grouped_moe_jobs as jobs
from tests.mcore import moe_lora_jobs
from tests.mcore.test_moe_gpt import _batch
from tests.mcore.test_moe_lora_gpt import _assert_matches_reference

TOL = 1e-12


@pytest.mark.parametrize("ep, etp", [(1, 1), (2, 1), (1, 2)])
def test_grouped_mlp_lora_matches_sequential(pool2, tmp_path, ep, etp):
    for r in pool2.run(jobs.parity_job, ep, etp, str(tmp_path / "ckpt")):
        assert r["grouped_type"] == "GroupedMLP" and r["host_type"] == "GroupedExpertsHost"
        assert r["grp_state"].keys() == r["seq_state"].keys()  # the same names (per expert)
        for name, t in r["seq_state"].items():
            assert torch.equal(r["grp_state"][name], t), name  # the same init, drawn per expert name
        assert (r["seq_logits"] - r["seq_base_logits"]).abs().max() > 1e-3
        torch.testing.assert_close(r["grp_logits"], r["seq_logits"], rtol=0, atol=TOL)
        assert r["grp_grads"].keys() == r["seq_grads"].keys()
        assert any(".local_experts." in n and g.abs().max() > 0 for n, g in r["seq_grads"].items())
        for name, g in r["seq_grads"].items():
            torch.testing.assert_close(r["grp_grads"][name], g, rtol=0, atol=TOL, msg=name)
        torch.testing.assert_close(r["grp_merged_logits"], r["grp_logits"], rtol=0, atol=1e-10)
        torch.testing.assert_close(r["grp_merged_logits"], r["seq_merged_logits"], rtol=0, atol=1e-10)
        # the GroupedMLP adapter's checkpoint loads into the SequentialMLP model by name
        torch.testing.assert_close(r["cross_logits"], r["seq_logits"], rtol=0, atol=TOL)


def test_grouped_mlp_refusals_name_the_cause(pool2):
    r = pool2.run(jobs.refusals_job)[0]
    assert "moe_grouped_gemm" in r["no_package"] and "grouped_gemm package" in r["no_package"]
    assert "LoRA only" in r["dora"] and "'dora'" in r["dora"]
    assert "lora_dropout" in r["dropout"]
    assert "share_expert_adapters" in r["share"]
    assert "all its experts or none" in r["partial"] and "mlp.experts.linear_fc1" in r["partial"]


def test_grouped_mlp_trains_as_sequential_world_one(pool2):
    """GroupedMLP built with the SequentialMLP experts' weights (init_gpt_weights draws each
    expert under its SequentialMLP name): five AdamW steps at EP 2 (finalize_grads with DP
    averaging, expert adapters over expert-DP) give the SequentialMLP world-1 losses and adapter."""
    ref = pool2.run(moe_lora_jobs.train_job, 1, 1, 1, 1, *_batch())[0]
    ranks = pool2.run(moe_lora_jobs.train_job, 1, 2, 1, 1, *_batch(), grouped=True)
    _assert_matches_reference(ranks, ref)
