"""`train` with prompt learning where a layout gives ranks no prompt tensor or hands the prompt to
DeepSpeed: PP=2 (the second stage holds no trainable tensor) and ZeRO-2 at TP=2 with sequence
parallelism (the prompt's per-rank partial gradients summed inside DeepSpeed's reduction), for
prompt tuning and for P-tuning with its LSTM encoder, plus ZeRO-3 at DP=2 (the prompt partitioned)
and ZeRO-1 at TP=2; and prefix tuning, the per-layer table (PP=2: each stage its layer's; ZeRO-3
at DP=2; ZeRO-2 at TP=2 + SP: the table split over TP) and PEFT's MLP (PP=2: replicated on both
stages, its partial gradients summed over TP x PP and counted once in the grad norm; ZeRO-2 at
TP=2 + SP; ZeRO-1 at TP=2), on the tiny GPT of train_jobs.BASE.

Oracles: each kind's world-size-1 run (a subprocess, same global batch and init): losses and grad
norms (clipping active) within 1e-5, every rank's prompt tensors equal to the reference's; the
uninterrupted run (2 steps + checkpoint + a resumed run for 3 more, bit-exact); PEFT itself
(P-tuning LSTM at PP=2: the run's export.verify_with_peft, <= 1e-4 on the exported HF base).
"""
from __future__ import annotations

import json

import pytest
import torch

from tests.harness.pool import JobFailed
from tests.integration.train_jobs import ZERO, full_tensors, kind_references, train_job

KINDS = {
    "prompt_tuning": ["adapter.kind=prompt_tuning", "adapter.num_virtual_tokens=4", "optim.lr=0.05",
                      "optim.grad_clip=0.003"],  # first grad norm ~0.005
    "p_tuning_lstm": ["adapter.kind=p_tuning", "adapter.num_virtual_tokens=4", "adapter.encoder_hidden_size=8",
                      "adapter.encoder_reparameterization_type=LSTM", "adapter.encoder_num_layers=2",
                      "optim.lr=0.02", "optim.grad_clip=0.01"],
    "prefix_table": ["adapter.kind=prefix_tuning", "adapter.num_virtual_tokens=3", "optim.lr=0.05",
                     "optim.grad_clip=0.015"],  # grad norms 0.021..0.025
    "prefix_mlp": ["adapter.kind=prefix_tuning", "adapter.num_virtual_tokens=3", "adapter.prefix_projection=true",
                   "adapter.encoder_hidden_size=8", "optim.lr=0.02", "optim.grad_clip=0.05"],  # 0.07..0.11
}
CLIP = {k: float(v[-1].split("=")[1]) for k, v in KINDS.items()}
LAYOUTS = {"pp2": ["parallel.pipeline=2"],
           "tp2_sp_zero2": ["parallel.tensor=2", "parallel.sequence_parallel=true", f"deepspeed={ZERO[2]}"],
           "dp2_zero3": [f"deepspeed={ZERO[3]}"], "tp2_zero1": ["parallel.tensor=2", f"deepspeed={ZERO[1]}"],
           "tp2_sp_pp2": ["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.pipeline=2"]}
SIZES = {"pp2": (1, 2, 1), "tp2_sp_zero2": (2, 1, 1), "dp2_zero3": (1, 1, 2), "tp2_zero1": (2, 1, 1),
         "tp2_sp_pp2": (2, 2, 1)}
"""(TP, PP, DP) of each layout."""
CASES = [(k, layout) for k in ("prompt_tuning", "p_tuning_lstm") for layout in ("pp2", "tp2_sp_zero2")] + [
    ("prompt_tuning", "dp2_zero3"), ("p_tuning_lstm", "tp2_zero1"), ("prompt_tuning", "tp2_sp_pp2"),
    ("prefix_table", "pp2"), ("prefix_mlp", "pp2"), ("prefix_mlp", "tp2_sp_zero2"), ("prefix_table", "dp2_zero3"),
    ("prefix_table", "tp2_sp_zero2"), ("prefix_mlp", "tp2_zero1"), ("prefix_mlp", "tp2_sp_pp2")]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    return kind_references(tmp_path_factory, KINDS, CLIP)


@pytest.mark.parametrize("kind, layout", CASES)
def test_prompt_layout_matches_world_size_one_and_resumes(request, references, tmp_path, kind, layout):
    reference = references(kind)
    tp, pp, dp = SIZES[layout]
    pool = request.getfixturevalue(f"pool{tp * pp * dp}")
    run = KINDS[kind] + LAYOUTS[layout]
    saving = [f"checkpoint.directory={tmp_path}/ck", "checkpoint.save_every=2"]
    verify = kind == "p_tuning_lstm" and layout == "pp2"
    export = [f"export.peft_dir={tmp_path}/peft", "export.verify_with_peft=true"] if verify else []
    no_pickle = "zero" in layout
    straight = pool.run(train_job, run)
    first = pool.run(train_job, run + saving, None, "auto", 2, no_pickle)
    second = pool.run(train_job, run + saving + export, None, "auto", None, no_pickle)

    for res in straight:
        assert res["losses"] == pytest.approx(reference["losses"], rel=0, abs=1e-5)
        assert res["grad_norms"] == pytest.approx(reference["grad_norms"], rel=0, abs=1e-5)
    assert full_tensors(straight).keys() == reference["full"].keys() and reference["full"]
    for res in straight:
        for name, (local, spec, _) in res["shards"].items():
            expected = spec.shard(reference["full"][name], res["ranks"]["tp"], tp)
            torch.testing.assert_close(local, expected, atol=1e-5, rtol=0,
                                       msg=f"{kind} {layout}: rank {res['ranks']} {name}")
    stage_of = {r["ranks"]["pp"]: sorted(r["shards"]) for r in straight}
    if pp == 2 and kind == "prefix_table":  # each stage its layer's table
        assert stage_of == {s: [f"prefix_tuning.default.layers.{s}.weight"] for s in (0, 1)}
    elif pp == 2:  # the second stage holds no prompt tensor; the prefix encoder's replica is not saved
        assert [bool(r["shards"]) for r in straight] == [r["ranks"]["pp"] == 0 for r in straight]
        assert sum(r["ranks"]["pp"] == 0 for r in straight) == tp

    assert second[0]["start_step"] == 2
    for a, b, c in zip(straight, first, second):
        assert b["losses"] + c["losses"] == a["losses"]  # bit-exact, fp32 on the CPU
        assert b["grad_norms"] + c["grad_norms"] == a["grad_norms"]
        assert a["shards"].keys() == c["shards"].keys()
        assert all(torch.equal(a["shards"][n][0], c["shards"][n][0]) for n in a["shards"])

    index = json.loads((tmp_path / "ck" / "step-000005" / "index.json").read_text())
    files = sorted(f for f in index["files"] if f.startswith(("shards/", "train_state/optim-")))
    # one optimizer state per rank (a stage without tensors: its LR group; the encoder's replica: its
    # own Adam state), tensors on the first stage only (prefix tables: each stage its layers')
    assert [f for f in files if f.startswith("train_state/")] == [
        f"train_state/optim-tp0{t}-pp0{s}-dp0{d}.{e}" for t in range(tp) for s in range(pp) for d in range(dp)
        for e in ("json", "safetensors")]
    stages = {f.split("-pp")[1][:2] for f in files if f.startswith("shards/")}
    assert stages == ({"00", "01"} if kind == "prefix_table" and pp == 2 else {"00"}), files
    if verify:
        assert second[0]["peft_max_logit_diff"] is not None and second[0]["peft_max_logit_diff"] <= 1e-4
        saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
        assert saved["peft_type"] == "P_TUNING" and saved["encoder_reparameterization_type"] == "LSTM"


def test_deepspeed_tp_sum_hooks_refuse_a_prompt_under_sequence_parallelism(pool2):
    """The hooks fallback sums a gradient as it is produced; an SP rank whose chunk holds no
    virtual position produces none for the prompt, and the others' all-reduce would wait."""
    # one micro-batch per step: the fallback refuses several first (test_training.py)
    run = KINDS["prompt_tuning"] + LAYOUTS["tp2_sp_zero2"] + ["optim.steps=1", "optim.micro_batch=4"]
    with pytest.raises(JobFailed, match=r"tp_sum='hooks'.*prompt"):
        pool2.run(train_job, run, None, "hooks")


def _engine_check_job(stages_with_params: list[int]) -> str:
    """The torch engine on a pipeline of the pool's ranks (the world group as pp_group)."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from parallel_adapters.train.engine import TorchEngine

    params = [torch.nn.Parameter(torch.zeros(1))] if dist.get_rank() in stages_with_params else []
    model = SimpleNamespace(groups=SimpleNamespace(pp_group=None), parameters=lambda: iter(params))
    try:
        engine = TorchEngine(model, 0.1, 0.0, 1.0)
    except ValueError as exc:
        return str(exc)
    engine.step(0.1, 1.0)  # an empty param group steps too
    return "ok"


def test_engine_refuses_only_a_pipeline_where_no_stage_trains(pool2):
    assert pool2.run(_engine_check_job, [0]) == ["ok", "ok"]
    assert all("no trainable parameters" in r for r in pool2.run(_engine_check_job, []))
