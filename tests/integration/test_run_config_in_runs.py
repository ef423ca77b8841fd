"""Run-config keys that only a run can show: EVA's step cap end to end, and the export.

Reference: the number of batches EVA consumed (TrainResult.eva_steps, counted by the runner's EVA
data) and EVA's own progress line on rank 0, against eva.max_steps; the export directory and
PEFT's logit check against export.peft_dir / export.verify_with_peft.
tests/unit/train/test_run_config_fields.py checks every other key without training.
"""
from __future__ import annotations

import pytest

from tests.integration.train_jobs import BASE

RUN_KEYS = ("export.peft_dir", "export.verify_with_peft")
"""The keys test_run_config_fields leaves to this module."""


def eva_run_job(overrides: list[str], resume: bool = False, stop_at: int | None = None) -> dict:
    """run_training(BASE + overrides) with rank 0's stderr captured (EVA's progress lines)."""
    import contextlib
    import io
    import warnings

    warnings.filterwarnings("ignore")
    from parallel_adapters.train.run_config import load_run_config
    from parallel_adapters.train.runner import run_training

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        result = run_training(load_run_config(None, BASE + list(overrides)), resume=resume, show_progress=True,
                              stop_at=stop_at)
    return {"eva_steps": result.eva_steps, "stderr": err.getvalue(), "rank": result.ranks["rank"],
            "start_step": result.start_step, "final_step": result.final_step,
            "export_dir": result.export_dir, "peft_diff": result.peft_max_logit_diff}


def _eva_lines(results: list[dict]) -> list[str]:
    rank0 = next(r for r in results if r["rank"] == 0)
    return [line for line in rank0["stderr"].splitlines() if line.startswith("EVA ")]


def test_eva_max_steps_from_the_command_line_stops_eva_with_init_eva(pool2, tmp_path):
    """The reported bug: adapter.init_lora_weights=eva (as in configs/demo.yaml) and eva.max_steps=4;
    with the export both RUN_KEYS reach the run as well."""
    overrides = ["parallel.tensor=2", "adapter.init_lora_weights=eva", "eva.max_steps=4", "optim.steps=2",
                 f"checkpoint.directory={tmp_path}/ck", f"export.peft_dir={tmp_path}/peft",
                 "export.verify_with_peft=true"]
    results = pool2.run(eva_run_job, overrides)
    assert [r["eva_steps"] for r in results] == [4, 4]
    lines = _eva_lines(results)
    assert lines and lines[-1].startswith("EVA stopped at max_steps=4"), lines
    assert all(r["export_dir"] == str(tmp_path / "peft") for r in results)
    assert (tmp_path / "peft" / "adapter_config.json").is_file()
    assert all(r["peft_diff"] is not None and r["peft_diff"] <= 1e-4 for r in results)


def test_eva_section_turns_eva_on_with_its_step_cap(pool2):
    """No export asked: none done (the control for RUN_KEYS)."""
    results = pool2.run(eva_run_job, ["eva.max_steps=3", "optim.steps=1"])  # BASE: init_lora_weights=false
    assert [r["eva_steps"] for r in results] == [3, 3]
    assert _eva_lines(results)[-1].startswith("EVA stopped at max_steps=3")

    assert all(r["export_dir"] is None and r["peft_diff"] is None for r in results)  # the export's control


def test_resume_after_eva_keeps_its_adapters_and_refuses_another_rank(pool2, tmp_path):
    """The checkpoint's adapter config (EVA's ranks) passes the resume check; adapter.r does not."""
    from tests.harness.pool import JobFailed

    run = ["parallel.tensor=2", "eva.max_steps=3", "optim.steps=2", f"checkpoint.directory={tmp_path}/ck"]
    first = pool2.run(eva_run_job, run, False, 1)
    assert [(r["eva_steps"], r["final_step"]) for r in first] == [(3, 1), (3, 1)]
    second = pool2.run(eva_run_job, run, True)
    assert [(r["eva_steps"], r["start_step"], r["final_step"]) for r in second] == [(None, 1, 2)] * 2
    with pytest.raises(JobFailed, match=r"adapter\.r=4, the run config has 8"):
        pool2.run(eva_run_job, run + ["adapter.r=8"], True)
