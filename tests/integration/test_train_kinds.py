"""`parallel-adapters train` with every adapter kind: configs/tiny_{loha,ia3,lokr}.yaml trained for
2 steps at TP=2 through run_training (the pool's gloo ranks), checkpointed, exported to PEFT and
verified by the run itself (export.verify_with_peft: PEFT on the HF base reproduces the Megatron
logits); then resumed for a third step from the checkpoint, which rebuilds the adapter of the
checkpoint's kind.  Oracle: PEFT (the run's own check, <= 1e-4) and the exported adapter_config.json.
"""
from __future__ import annotations

import json

import pytest

from tests.integration.train_jobs import REPO

KINDS = {"loha": "LOHA", "ia3": "IA3", "lokr": "LOKR"}


def kind_run_job(config_path: str, overrides: list[str], resume: bool) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    from parallel_adapters.train.run_config import load_run_config
    from parallel_adapters.train.runner import run_training

    result = run_training(load_run_config(config_path, overrides), resume=resume, show_progress=False)
    return {"losses": result.losses, "start_step": result.start_step, "final_step": result.final_step,
            "export_dir": result.export_dir, "peft_diff": result.peft_max_logit_diff}


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_kind_config_trains_exports_and_resumes(pool2, tmp_path, kind):
    path = str(REPO / "configs" / f"tiny_{kind}.yaml")
    run = ["optim.steps=2", "optim.warmup_steps=0", "optim.micro_batch=2", "checkpoint.save_every=2",
           f"checkpoint.directory={tmp_path}/ck", f"export.peft_dir={tmp_path}/peft", "logging.metrics_jsonl=null",
           "logging.every=1"]
    results = pool2.run(kind_run_job, path, run, False)
    for r in results:
        assert r["final_step"] == 2 and len(r["losses"]) == 2 and r["export_dir"] == str(tmp_path / "peft")
        assert r["peft_diff"] is not None and r["peft_diff"] <= 1e-4, r["peft_diff"]
    saved = json.loads((tmp_path / "ck" / "step-000002" / "adapter_config.json").read_text())
    assert saved["adapter_kind"] == kind
    exported = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert exported["peft_type"] == KINDS[kind]
    more = pool2.run(kind_run_job, path, [*run, "optim.steps=3", "export.peft_dir=null",
                                          "export.verify_with_peft=false"], True)
    assert [(r["start_step"], r["final_step"]) for r in more] == [(2, 3)] * 2
