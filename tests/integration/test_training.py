"""run_training end to end on real gloo ranks (the worker pools, not torchrun: faster).

Oracle: the same run at world size 1 (TP=1, PP=1, DP=1; a subprocess), on the same global batch.
Every layout (TP=2 with sequence parallelism, TP=2 + ZeRO-1, DP=2 + ZeRO-2, TP=2 x DP=2 + ZeRO-3,
PP=2, TP=2 x PP=2, ...) must give the same losses and grad norms over 5 AdamW steps with global
grad-norm clipping active (fp32: rel/abs 1e-5), and every rank's adapter shards must equal the
reference's full tensors sliced by the shard's ShardSpec (this catches DeepSpeed overwriting TP
shards with rank 0's, and a missing or misplaced TP sum of replicated factors: without the TP sum
under ZeRO-2 the loss is off by 2.6e-2 and the weights by 5e-2).  Resume: 20 steps in one go ==
10 steps, checkpoint, a new run resuming from `latest`, 10 more: bit-identical losses and weights,
for the torch engine and ZeRO 1, 2 and 3, whose checkpoints hold only safetensors + JSON (no
DeepSpeed pickles: torch.save/torch.load raise during those runs).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from parallel_adapters.checkpoint.outputs import OUTPUT_MARKER
from tests.harness.pool import JobFailed
from tests.integration.train_jobs import ZERO, full_tensors, train_job, world_size_one_reference

VARIANTS = {  # name: (pool fixture, overrides, DeepSpeed TP-sum mechanism)
    "tp2_sequence_parallel": ("pool2", ["parallel.tensor=2", "parallel.sequence_parallel=true"], "auto"),
    "tp2_zero1": ("pool2", ["parallel.tensor=2", f"deepspeed={ZERO[1]}"], "auto"),
    "dp2_zero2": ("pool2", [f"deepspeed={ZERO[2]}"], "auto"),
    "tp2_dp2_zero3": ("pool4", ["parallel.tensor=2", f"deepspeed={ZERO[3]}"], "auto"),
    "pp2": ("pool2", ["parallel.pipeline=2"], "auto"),
    "tp2_pp2": ("pool4", ["parallel.tensor=2", "parallel.pipeline=2"], "auto"),
    "dp2_torch": ("pool2", [], "auto"),
    "tp2_dp2_zero2_hook_fallback": ("pool4", ["parallel.tensor=2", f"deepspeed={ZERO[2]}"], "hooks"),
    "tp2_sp_full_recompute": ("pool2", ["parallel.tensor=2", "parallel.sequence_parallel=true",
                                        "model.recompute=full"], "auto"),
    "pp2_selective_recompute": ("pool2", ["parallel.pipeline=2", "model.recompute=selective"], "auto"),
}
CLIP = 0.5  # optim.grad_clip in train_jobs.BASE


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    return world_size_one_reference([], tmp_path_factory.mktemp("reference") / "reference.pt", CLIP, min_drop=1e-2)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_layout_matches_world_size_one(request, reference, name):
    pool_name, overrides, tp_sum = VARIANTS[name]
    results = request.getfixturevalue(pool_name).run(train_job, overrides, None, tp_sum)
    for res in results:
        assert res["losses"] == pytest.approx(reference["losses"], rel=1e-5, abs=1e-5)
        assert res["grad_norms"] == pytest.approx(reference["grad_norms"], rel=1e-4)
    full = full_tensors(results)
    assert full.keys() == reference["full"].keys() and len(full) == 2 * 4 * 2
    for res in results:  # every rank's own shards, DP replicas included
        for tensor_name, (local, spec, global_shape) in res["shards"].items():
            want = spec.shard(reference["full"][tensor_name], res["ranks"]["tp"], res["tp_size"])
            torch.testing.assert_close(local, want, atol=1e-5, rtol=1e-4,
                                       msg=f"{name}: rank {res['ranks']} {tensor_name}")


def test_hook_fallback_sums_sequence_parallel_modules_to_save(pool2, tmp_path):
    """tp_sum='hooks' (ZeRO-2) at TP=2 + SP with final_layernorm trained through modules_to_save:
    each TP rank's norm gradient covers only its slice of the sequence, so the hooks sum it over TP
    as finalize_grads does; the run matches world size 1 (unsummed, the ranks' norms drift apart)."""
    trained = ["adapter.modules_to_save=[final_layernorm]"]
    ref = world_size_one_reference(trained, tmp_path / "reference.pt", CLIP)
    # one micro-batch per step: with several, this fallback loses all but the last under ZeRO-2
    # (DeepSpeed sees gradient_accumulation_steps 1), whatever the TP sum
    overrides = trained + ["parallel.tensor=2", "parallel.sequence_parallel=true", "optim.micro_batch=4",
                           f"deepspeed={ZERO[2]}"]
    results = pool2.run(train_job, overrides, None, "hooks")
    for res in results:
        assert res["losses"] == pytest.approx(ref["losses"], rel=1e-5, abs=1e-5)
        assert res["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-4)
    full = full_tensors(results)
    assert full.keys() == ref["full"].keys()
    for name, tensor in full.items():
        torch.testing.assert_close(tensor, ref["full"][name], atol=1e-5, rtol=1e-4, msg=name)


def test_hook_fallback_refuses_several_micro_batches_per_step(pool2):
    """Under tp_sum='hooks' every backward is a DeepSpeed step boundary (gradient_accumulation_steps
    1), so a rank's micro-batches would not add up under ZeRO-2: refused, naming the numbers.
    DP 2 with global batch 4 and micro batch 1: two micro-batches per rank per step."""
    with pytest.raises(JobFailed, match=r"tp_sum='hooks'.*one micro-batch per rank per step, this run has 2"):
        pool2.run(train_job, [f"deepspeed={ZERO[2]}", "optim.micro_batch=1"], None, "hooks")


def test_bfloat16_base_at_tp2_trains_float32_adapters_close_to_the_float32_reference(pool2, reference):
    """model.dtype=bfloat16: the base and activations in bf16 (TP=2, sequence parallel), the
    adapters float32.  Same data and init as the fp32 world-1 reference: the losses agree to bf16
    precision and the run trains."""
    overrides = ["parallel.tensor=2", "parallel.sequence_parallel=true", "model.dtype=bfloat16"]
    for res in pool2.run(train_job, overrides):
        assert res["losses"] == pytest.approx(reference["losses"], rel=3e-2)
        assert max(abs(a - b) for a, b in zip(res["losses"], reference["losses"])) > 1e-4  # bf16 did run
        assert res["losses"][-1] < res["losses"][0] - 1e-2
        assert {local.dtype for local, _, _ in res["shards"].values()} == {torch.float32}
        for tensor_name, (local, spec, _) in res["shards"].items():
            want = spec.shard(reference["full"][tensor_name], res["ranks"]["tp"], res["tp_size"])
            assert (local - want).norm() < 0.05 * want.norm(), tensor_name  # Adam: elementwise outliers


RESUME_RUN = ["optim.steps=20", "optim.schedule=cosine", "optim.warmup_steps=3", "adapter.lora_dropout=0.1"]
RESUME_VARIANTS = {  # name: (pool fixture, overrides); ZeRO with DP=2 so that its state is partitioned
    "torch": ("pool2", ["parallel.tensor=2"]),
    "zero1_tp2_dp2": ("pool4", ["parallel.tensor=2", f"deepspeed={ZERO[1]}"]),
    "zero2_dp2": ("pool2", [f"deepspeed={ZERO[2]}"]),
    "zero3_tp2": ("pool2", ["parallel.tensor=2", f"deepspeed={ZERO[3]}"]),
    "zero3_dp2": ("pool2", [f"deepspeed={ZERO[3]}"]),
    "pp2": ("pool2", ["parallel.pipeline=2"]),  # each stage's dropout stream resumes from its own rng file
    "megatron_dropout_tp2_sp": ("pool2", ["parallel.tensor=2", "parallel.sequence_parallel=true",
                                          "model.attention_dropout=0.1", "model.hidden_dropout=0.1"]),
}


@pytest.mark.parametrize("name", list(RESUME_VARIANTS))
def test_resume_is_bit_exact(request, tmp_path, name):
    """20 steps in one go == 10 steps + checkpoint + a new run resuming from `latest` + 10 more.
    DeepSpeed: its state goes through the checkpoint's safetensors + JSON only (torch.save and
    torch.load raise during the checkpointed runs; nothing else is on disk)."""
    pool_name, overrides = RESUME_VARIANTS[name]
    pool = request.getfixturevalue(pool_name)
    run = RESUME_RUN + overrides
    saving = [f"checkpoint.directory={tmp_path}/ck", "checkpoint.save_every=4", "checkpoint.keep_last=2",
              f"logging.metrics_jsonl={tmp_path}/metrics.jsonl"]
    no_pickle = name != "torch"
    straight = pool.run(train_job, run)
    first = pool.run(train_job, run + saving, None, "auto", 10, no_pickle)  # stops after step 10, saves
    second = pool.run(train_job, run + saving, None, "auto", None, no_pickle)  # resumes from `latest` itself
    assert second[0]["start_step"] == 10 and second[0]["resumed_from"] == str(tmp_path / "ck" / "step-000010")
    for a, b, c in zip(straight, first, second):
        assert b["losses"] + c["losses"] == a["losses"]  # bit-exact, fp32 on the CPU
        assert b["grad_norms"] + c["grad_norms"] == a["grad_norms"]
        assert all(torch.equal(a["shards"][n][0], c["shards"][n][0]) for n in a["shards"])
    assert sorted(p.name for p in (tmp_path / "ck").glob("step-*")) == ["step-000016", "step-000020"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 21))
    _assert_only_safetensors_and_json(tmp_path / "ck")


def _assert_only_safetensors_and_json(parent) -> None:
    """Under a run's checkpoint directory: only `latest` (the pointer) and step directories holding
    valid .safetensors and .json files (no DeepSpeed engine_state/, no .pt, no pickle)."""
    from safetensors import safe_open

    top = sorted(p.name for p in parent.iterdir())
    assert top == [OUTPUT_MARKER, "latest", "step-000016", "step-000020"], top
    files = [p for p in parent.rglob("*") if p.is_file() and p != parent / "latest"]
    assert files and all(p.suffix in (".safetensors", ".json") for p in files), sorted(map(str, files))
    for path in files:
        if path.suffix == ".json":
            json.loads(path.read_text())
        else:
            with safe_open(str(path), "pt") as fh:
                assert list(fh.keys()), path


def test_deepspeed_checkpoint_holds_zero_state_per_rank(pool2, tmp_path):
    """ZeRO-2 at DP=2: each rank's optimizer state holds its own half of the fp32 partition and
    of the AdamW moments, DeepSpeed's scalars, and the layout that rebuilds its state_dict.
    Resuming it under another ZeRO stage, or checkpointing a setup whose state cannot be stored
    without DeepSpeed's pickles (elastic_checkpoint), is refused on every rank."""
    from safetensors import safe_open

    pool2.run(train_job, [f"deepspeed={ZERO[2]}", "optim.steps=2", f"checkpoint.directory={tmp_path}/ck"],
              None, "auto", None, True)
    ck = tmp_path / "ck" / "step-000002"
    ranks = json.loads((ck / "index.json").read_text())["train_state"]["optimizer"]
    assert len(ranks) == 2
    partitions = []
    for rels in ranks.values():
        scalars = json.loads((ck / rels["scalars"]).read_text())
        assert scalars["deepspeed/zero_stage"] == 2
        assert scalars["deepspeed/optimizer_class"] == "DeepSpeedZeroOptimizer"
        assert scalars["deepspeed/engine/global_steps"] == 2
        assert scalars["deepspeed/optimizer/clip_grad"] == CLIP
        assert scalars["deepspeed/optimizer/loss_scaler/cur_scale"] == 1.0
        layout = json.loads(scalars["deepspeed/optimizer/__layout__"])
        entries = dict(layout["dict"])
        assert entries["zero_stage"] == {"enum": "deepspeed.runtime.zero.config.ZeroStageEnum", "value": 2}
        assert entries["loss_scaler"]["object"] == "deepspeed.runtime.fp16.loss_scaler.LossScaler"
        with safe_open(str(ck / rels["tensors"]), "pt") as fh:
            part = fh.get_tensor("deepspeed/optimizer/single_partition_of_fp32_groups/0")
            for moment in ("exp_avg", "exp_avg_sq"):
                assert fh.get_tensor(f"deepspeed/optimizer/base_optimizer_state/state/0/{moment}").shape == part.shape
            assert fh.get_tensor("deepspeed/optimizer/base_optimizer_state/state/0/step").item() == 2
        partitions.append(part)
    # 2 layers x (proj 256+256, qkv 256+512, fc1 256+1024, fc2 512+256) = 6656 fp32, halved over DP
    assert [p.numel() for p in partitions] == [3328, 3328] and not torch.equal(*partitions)

    with pytest.raises(JobFailed, match=r"saved with ZeRO stage 2 \(DeepSpeedZeroOptimizer\); this run uses ZeRO st"):
        pool2.run(train_job, [f"deepspeed={ZERO[3]}", "optim.steps=4", f"checkpoint.directory={tmp_path}/ck"])
    elastic = json.loads(Path(ZERO[2]).read_text())
    elastic["zero_optimization"]["elastic_checkpoint"] = True
    (tmp_path / "elastic.json").write_text(json.dumps(elastic))
    with pytest.raises(JobFailed, match=r"elastic_checkpoint=true is not supported by checkpoints"):
        pool2.run(train_job, [f"deepspeed={tmp_path}/elastic.json", f"checkpoint.directory={tmp_path}/ck2"])


def test_impossible_layout_is_refused_on_every_rank(pool2):
    message = r"parallel\.tensor=3 x parallel\.pipeline=1 = 3 does not divide the world size 2"
    with pytest.raises(JobFailed, match=message):
        pool2.run(train_job, ["parallel.tensor=3"])


@pytest.mark.parametrize("dtype, limit", [("float32", 1e-4), ("bfloat16", 0.05)])
def test_export_and_peft_reproduces_the_trained_model(pool2, tmp_path, dtype, limit):
    """The run's final export, loaded by PEFT onto the HF form of the base, gives the Megatron
    logits (export.verify_with_peft; TP=2 with sequence parallelism).  On a bfloat16 base, PEFT
    still runs in float32, so the two agree only to bf16 precision."""
    results = pool2.run(train_job, ["parallel.tensor=2", "parallel.sequence_parallel=true", f"model.dtype={dtype}",
                                    f"checkpoint.directory={tmp_path}/ck", f"export.peft_dir={tmp_path}/peft",
                                    "export.verify_with_peft=true"])
    assert {r["export_dir"] for r in results} == {str(tmp_path / "peft")}
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    assert all(r["peft_max_logit_diff"] < limit for r in results), [r["peft_max_logit_diff"] for r in results]
