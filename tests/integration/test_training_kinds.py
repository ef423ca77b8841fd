"""What every adapter kind gets from the generic paths, for IA3, LoHa and LoKr: run_training on
real gloo ranks (the worker pools) under TP=2 + sequence parallelism, PP=2, TP=2 x PP=2, ZeRO 1 / 2 / 3,
full activation recompute (TP=2 + SP), resume, and resharding a TP=2 checkpoint to TP=1 and that
one back to TP=2.

Oracles: each kind's own world-size-1 run (a subprocess, same global batch and init; losses and
grad norms within 1e-5, every rank's adapter shards equal to the reference's full tensors sliced
by their ShardSpec); the uninterrupted run (resume, bit-exact); the TP=2 model that was saved
(resharding: identical full tensors, and a TP=1 model loading the resharded checkpoint gives the
same logits).  IA3 targets all four linears so that a replicated vector with a TP-partial
gradient (linear_proj's output under SP), a column vector over fused parts (q/k/v: k and v only;
gate/up: both chunks) and a row-sharded input vector (linear_fc2, feedforward) are all covered.
"""
from __future__ import annotations

import json

import pytest
import torch

from tests.integration.test_training import _assert_only_safetensors_and_json
from tests.integration.train_jobs import BASE, ZERO, _quiet, full_tensors, kind_references, train_job

TARGETS = "[linear_qkv,linear_proj,linear_fc1,linear_fc2]"
KIND_OVERRIDES = {
    "ia3": ["adapter.kind=ia3", f"adapter.target_modules={TARGETS}", "adapter.feedforward_modules=[linear_fc2]",
            "adapter.fused_parts={linear_qkv: [k, v]}", "adapter.init_ia3_weights=true",
            "optim.grad_clip=0.01"],  # IA3's first grad norm is ~0.015: clipping must still be active
    "loha": ["adapter.kind=loha", "adapter.r=4", "adapter.alpha=8", f"adapter.target_modules={TARGETS}",
             "adapter.init_weights=false", "optim.grad_clip=0.05"],  # first grad norm ~0.09
    "lokr": ["adapter.kind=lokr", "adapter.r=2", "adapter.alpha=4", "adapter.decompose_both=true",
             "adapter.decompose_factor=4", f"adapter.target_modules={TARGETS}", "adapter.init_weights=false"],
}
LAYOUTS = {  # name: (pool fixture, overrides)
    "tp2_sp": ("pool2", ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    "pp2": ("pool2", ["parallel.pipeline=2"]),
    "dp2_zero2": ("pool2", [f"deepspeed={ZERO[2]}"]),
    "tp2_sp_zero2": ("pool2", ["parallel.tensor=2", "parallel.sequence_parallel=true", f"deepspeed={ZERO[2]}"]),
    "tp2_dp2_zero3": ("pool4", ["parallel.tensor=2", f"deepspeed={ZERO[3]}"]),
    "dp2_zero3": ("pool2", [f"deepspeed={ZERO[3]}"]),
    "dp2_zero1": ("pool2", [f"deepspeed={ZERO[1]}"]),
    "tp2_pp2": ("pool4", ["parallel.tensor=2", "parallel.pipeline=2"]),
    "tp2_sp_recompute": ("pool2", ["parallel.tensor=2", "parallel.sequence_parallel=true", "model.recompute=full"]),
}
CASES = [(k, layout) for k in KIND_OVERRIDES for layout in ("tp2_sp", "pp2", "dp2_zero1", "tp2_pp2", "tp2_sp_recompute")] + [
    ("ia3", "tp2_sp_zero2"), ("loha", "dp2_zero2"), ("lokr", "tp2_sp_zero2"), ("ia3", "tp2_dp2_zero3"),
    ("loha", "dp2_zero3"), ("lokr", "dp2_zero3")]
CLIP = {"ia3": 0.01, "loha": 0.05, "lokr": 0.5}  # optim.grad_clip (train_jobs.BASE: 0.5)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    return kind_references(tmp_path_factory, KIND_OVERRIDES, CLIP)


@pytest.mark.parametrize("kind, layout", CASES)
def test_kind_layout_matches_world_size_one(request, references, kind, layout):
    pool_name, overrides = LAYOUTS[layout]
    reference = references(kind)
    results = request.getfixturevalue(pool_name).run(train_job, KIND_OVERRIDES[kind] + overrides)
    for res in results:
        assert res["losses"] == pytest.approx(reference["losses"], rel=1e-5, abs=1e-5)
        assert res["grad_norms"] == pytest.approx(reference["grad_norms"], rel=1e-5, abs=1e-5)
    assert full_tensors(results).keys() == reference["full"].keys() and reference["full"]
    for res in results:  # every rank's own shards, DP replicas included
        for tensor_name, (local, spec, _) in res["shards"].items():
            want = spec.shard(reference["full"][tensor_name], res["ranks"]["tp"], res["tp_size"])
            torch.testing.assert_close(local, want, atol=1e-5, rtol=1e-5,
                                       msg=f"{kind} {layout}: rank {res['ranks']} {tensor_name}")


RESUME_RUN = ["optim.steps=20", "optim.schedule=cosine", "optim.warmup_steps=3"]
RESUME_CASES = [(k, engine) for k in KIND_OVERRIDES for engine in ("torch_tp2", "zero2_dp2")]
RESUME_ENGINES = {"torch_tp2": ["parallel.tensor=2"], "zero2_dp2": [f"deepspeed={ZERO[2]}"]}


@pytest.mark.parametrize("kind, engine", RESUME_CASES)
def test_kind_resume_is_bit_exact(pool2, tmp_path, kind, engine):
    """20 steps in one go == 10 steps + checkpoint + a new run resuming from `latest` + 10 more
    (ZeRO-2: through the checkpoint's safetensors + JSON only)."""
    run = KIND_OVERRIDES[kind] + RESUME_RUN + RESUME_ENGINES[engine]
    saving = [f"checkpoint.directory={tmp_path}/ck", "checkpoint.save_every=4", "checkpoint.keep_last=2",
              f"logging.metrics_jsonl={tmp_path}/metrics.jsonl"]
    no_pickle = engine != "torch_tp2"
    straight = pool2.run(train_job, run)
    first = pool2.run(train_job, run + saving, None, "auto", 10, no_pickle)
    second = pool2.run(train_job, run + saving, None, "auto", None, no_pickle)
    assert second[0]["start_step"] == 10 and second[0]["resumed_from"] == str(tmp_path / "ck" / "step-000010")
    for a, b, c in zip(straight, first, second):
        assert b["losses"] + c["losses"] == a["losses"]  # bit-exact, fp32 on the CPU
        assert b["grad_norms"] + c["grad_norms"] == a["grad_norms"]
        assert a["shards"].keys() == c["shards"].keys() and a["shards"]
        assert all(torch.equal(a["shards"][n][0], c["shards"][n][0]) for n in a["shards"])
    saved = json.loads((tmp_path / "ck" / "step-000020" / "adapter_config.json").read_text())
    assert saved["adapter_kind"] == kind
    _assert_only_safetensors_and_json(tmp_path / "ck")


def evaluate_job(overrides: list[str], checkpoint: str, tokens: str, out: str) -> None:
    """run_evaluation (the checkpoint's adapter loaded into a fresh model at the config's TP)."""
    from parallel_adapters.train.evaluate import run_evaluation
    from parallel_adapters.train.run_config import load_run_config

    _quiet()
    base = [b for b in BASE if not b.startswith("adapter.")]
    run_evaluation(load_run_config(None, base + overrides), checkpoint, tokens, out)


@pytest.mark.parametrize("kind", list(KIND_OVERRIDES))
def test_kind_tp2_checkpoint_reshards_to_tp1_and_back(pool2, tmp_path, kind):
    """A TP=2 checkpoint resharded to TP=1: the same full tensors as the run's (and as the TP=2
    checkpoint consolidated); evaluated by a TP=1 model, the logits of the TP=2 model that saved it.
    That TP=1 checkpoint resharded to TP=2: every rank's stored piece equal to the saved run's, and
    a TP=2 model loading it gives the same logits again."""
    from safetensors.torch import load_file

    from parallel_adapters.checkpoint.consolidate import consolidate, reshard
    from parallel_adapters.checkpoint.reader import CheckpointReader

    results = pool2.run(train_job, KIND_OVERRIDES[kind] + ["parallel.tensor=2", "optim.steps=3",
                                                           f"checkpoint.directory={tmp_path}/ck",
                                                           "checkpoint.save_every=1", "checkpoint.keep_last=3"])
    trained = full_tensors(results)
    ck = tmp_path / "ck" / "step-000003"
    out = reshard(ck, tmp_path / "tp1", 1, progress=False)
    assert json.loads((out / "index.json").read_text())["tp_size"] == 1
    back = reshard(out, tmp_path / "tp2", 2, progress=False)
    for full in (consolidate(ck), consolidate(out), consolidate(back)):
        assert full.keys() == trained.keys() and full
        for name, tensor in full.items():
            assert torch.equal(tensor, trained[name]), name
    with CheckpointReader(ck) as saved, CheckpointReader(back) as resharded:
        assert saved.tensors.keys() == resharded.tensors.keys()
        split = 0
        for name, info in saved.tensors.items():  # each stored piece (a replicated tensor: one rank's)
            again = resharded.info(name)
            assert (again.split_size, sorted(again.files)) == (info.split_size, sorted(info.files)), name
            for rank in info.files:
                assert torch.equal(resharded.read_piece(again, rank), saved.read_piece(info, rank)), name
            split += info.split_size == 2
        assert split, "some tensor must be split over the two ranks"
    tokens = torch.randint(0, 257, (3, 12), generator=torch.Generator().manual_seed(5))
    (tmp_path / "ids.txt").write_text("\n".join(" ".join(map(str, t.tolist())) for t in tokens) + "\n")
    logits = {}
    runs = ((2, 2, ck), (1, 1, out), ("back", 2, back), ("step1", 2, tmp_path / "ck" / "step-000001"))
    for key, tp, directory in runs:
        pool2.run(evaluate_job, KIND_OVERRIDES[kind] + [f"parallel.tensor={tp}"], str(directory),
                  str(tmp_path / "ids.txt"), str(tmp_path / f"{key}.safetensors"))
        logits[key] = load_file(str(tmp_path / f"{key}.safetensors"))
    assert sorted(logits[1]) == sorted(logits[2]) == sorted(logits["back"]) == ["logits.0", "logits.1", "logits.2",
                                                                                "perplexity"]
    for name in logits[2]:
        torch.testing.assert_close(logits[1][name], logits[2][name], atol=1e-5, rtol=1e-5, msg=name)
        torch.testing.assert_close(logits["back"][name], logits[2][name], atol=1e-5, rtol=1e-5, msg=name)
    # the loaded adapter is what sets the logits: the step-1 checkpoint's differ
    assert (logits["step1"]["logits.0"] - logits[2]["logits.0"]).abs().max() > 1e-4


DROPOUT_RUN = ["adapter.rank_dropout=0.5", "adapter.module_dropout=0.3", "parallel.tensor=2",
               "parallel.sequence_parallel=true", "optim.steps=4"]


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_kind_dropout_resume_is_bit_exact_and_recompute_replays_it(pool2, tmp_path, references, kind):
    """rank_dropout and module_dropout on (TP=2 + SP, 4 steps): the losses differ from the run
    without dropout; full activation recompute replays the masks (the same losses and grad norms);
    2 steps + checkpoint + 2 resumed are bit-exact with 4 (the streams' RNG-tracker states saved)."""
    run = KIND_OVERRIDES[kind] + DROPOUT_RUN + (["adapter.rank_dropout_scale=true"] if kind == "lokr" else [])
    saving = [f"checkpoint.directory={tmp_path}/ck", "checkpoint.save_every=2"]
    straight = pool2.run(train_job, run)
    recomputed = pool2.run(train_job, run + ["model.recompute=full"])
    first = pool2.run(train_job, run + saving, None, "auto", 2)
    second = pool2.run(train_job, run + saving)
    assert second[0]["start_step"] == 2
    assert abs(straight[0]["losses"][0] - references(kind)["losses"][0]) > 1e-4  # step 1: the same weights
    for a, r, b, c in zip(straight, recomputed, first, second):
        assert r["losses"] == pytest.approx(a["losses"], rel=1e-6, abs=1e-6)
        assert r["grad_norms"] == pytest.approx(a["grad_norms"], rel=1e-6, abs=1e-6)
        assert b["losses"] + c["losses"] == a["losses"]  # bit-exact, fp32 on the CPU
        assert b["grad_norms"] + c["grad_norms"] == a["grad_norms"]
        assert all(torch.equal(a["shards"][n][0], c["shards"][n][0]) for n in a["shards"])
