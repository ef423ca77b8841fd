"""The offline commands on what a run leaves behind: its checkpoint directory (`latest`, or
`--step N`) and a checkpoint that records its base model, so that `export` needs no `--hf-config`
and `merge` no `--base`.

Two short runs on the pool's gloo ranks (TP=2, a checkpoint at every step): one imports a tiny HF
Llama, one builds its model from GPT settings and exports at the end.  Oracles: the same commands
on the step directory with the flags given (already checked against PEFT and transformers by
test_cli_export.py / test_peft_export.py) must write byte-identical files; the GPT run's own export
(config.json derived from the model, train/finish.py) likewise.  The commands run in-process
through `cli.main` (the same parser and handlers as the console script).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from parallel_adapters.checkpoint.files import file_record
from parallel_adapters.cli import main
from tests.helpers.tiny_llama import make_tiny_llama
from tests.integration.train_jobs import train_job

TRAIN = ["parallel.tensor=2", "optim.steps=2", "checkpoint.save_every=1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, pool2):
    root = tmp_path_factory.mktemp("run_dir")
    hf = make_tiny_llama(root / "hf", vocab_size=257)  # the byte tokenizer's ids
    pool2.run(train_job, [*TRAIN, f"model.hf_checkpoint={hf}", "data.tokenizer=byte",
                          f"checkpoint.directory={root / 'hf_run'}"])
    pool2.run(train_job, [*TRAIN, f"checkpoint.directory={root / 'gpt_run'}", f"export.peft_dir={root / 'gpt_peft'}"])
    return {"root": root, "hf": hf, "run": root / "hf_run", "gpt_run": root / "gpt_run", "gpt_peft": root / "gpt_peft"}


def _cli(capsys, *args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `parallel-adapters ARGS`."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _ok(capsys, *args) -> tuple[str, str]:
    code, out, err = _cli(capsys, *args)
    assert code == 0, err
    return out, err


def _error(capsys, *args) -> str:
    code, _, err = _cli(capsys, *args)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("parallel-adapters ")]
    assert len(lines) == 1, err
    return lines[0]


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _rewrite(step: Path, drop_hf_config: bool = False, edit_config=None) -> None:
    """Change what a checkpoint records and re-record its checksums (as an older save, or a
    checkpoint whose base has moved, would look)."""
    index = json.loads((step / "index.json").read_text())
    if drop_hf_config:
        (step / "hf_config.json").unlink()
        del index["files"]["hf_config.json"]
    if edit_config is not None:
        config = json.loads((step / "adapter_config.json").read_text())
        edit_config(config)
        (step / "adapter_config.json").write_text(json.dumps(config))
        index["files"]["adapter_config.json"] = file_record(step / "adapter_config.json")
    (step / "index.json").write_text(json.dumps(index))


def test_a_run_records_its_hf_base_in_every_checkpoint(runs):
    run, hf = runs["run"], runs["hf"]
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) == ["latest", "step-000001",
                                                                                   "step-000002"]
    for step in ("step-000001", "step-000002"):
        assert (run / step / "hf_config.json").read_bytes() == (hf / "config.json").read_bytes()
        assert json.loads((run / step / "adapter_config.json").read_text())["base_model_name_or_path"] == str(hf)
        assert "hf_config.json" in json.loads((run / step / "index.json").read_text())["files"]


def test_every_command_takes_the_run_directory(runs, tmp_path, capsys):
    run, hf, step = runs["run"], runs["hf"], runs["run"] / "step-000002"
    out, err = _ok(capsys, "inspect", run)
    assert f"using {step} (named by {run / 'latest'})" in err
    assert out.startswith(f"{step}: tp=2 pp=1") and f"base model: {hf}" in out
    out, err = _ok(capsys, "verify", run)
    assert f"{step}: ok (" in out and f"using {step}" in err

    _ok(capsys, "export", run, "--out", tmp_path / "peft")
    _ok(capsys, "export", step, "--out", tmp_path / "peft_flags", "--hf-config", hf)
    assert _digests(tmp_path / "peft") == _digests(tmp_path / "peft_flags")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(hf)

    _ok(capsys, "merge", run, "--out", tmp_path / "merged")
    _ok(capsys, "merge", step, "--base", hf, "--out", tmp_path / "merged_flags")
    assert _digests(tmp_path / "merged") == _digests(tmp_path / "merged_flags")
    assert _digests(tmp_path / "merged")["model.safetensors"] != _digests(hf)["model.safetensors"]  # folded in
    _ok(capsys, "merge", tmp_path / "peft", "--out", tmp_path / "merged_peft")  # the PEFT adapter names its base
    assert _digests(tmp_path / "merged_peft")["model.safetensors"] == _digests(tmp_path / "merged")["model.safetensors"]

    _, err = _ok(capsys, "consolidate", run, "--out", tmp_path / "full", "--tp", "1")
    assert f"using {step}" in err
    assert (tmp_path / "full" / "hf_config.json").read_bytes() == (hf / "config.json").read_bytes()
    _ok(capsys, "verify", tmp_path / "full")  # the copied record is listed and checksummed
    _ok(capsys, "export", tmp_path / "full", "--out", tmp_path / "peft_from_full")
    assert _digests(tmp_path / "peft_from_full") == _digests(tmp_path / "peft")


def test_step_picks_a_checkpoint(runs, tmp_path, capsys):
    run, hf = runs["run"], runs["hf"]
    out, err = _ok(capsys, "inspect", run, "--step", "1")
    assert f"using {run / 'step-000001'} (--step 1)" in err and out.startswith(f"{run / 'step-000001'}:")
    _ok(capsys, "export", run, "--step", "1", "--out", tmp_path / "one")
    _ok(capsys, "export", run / "step-000001", "--hf-config", hf, "--out", tmp_path / "one_flags")
    _ok(capsys, "export", run, "--step", "2", "--out", tmp_path / "two")
    assert _digests(tmp_path / "one") == _digests(tmp_path / "one_flags")
    weights = "adapter_model.safetensors"
    assert (tmp_path / "one" / weights).read_bytes() != (tmp_path / "two" / weights).read_bytes()
    _ok(capsys, "merge", run, "--step", "1", "--out", tmp_path / "merged_one")
    _ok(capsys, "merge", run / "step-000001", "--base", hf, "--out", tmp_path / "merged_one_flags")
    assert _digests(tmp_path / "merged_one") == _digests(tmp_path / "merged_one_flags")


def test_errors_name_what_to_pass_instead(runs, tmp_path, capsys):
    run = runs["run"]
    line = _error(capsys, "export", run, "--step", "7", "--out", tmp_path / "x")
    assert f"{run / 'step-000007'} does not exist" in line and "available: 1, 2" in line
    assert f"such as {run / 'step-000002'}" in line
    (tmp_path / "empty").mkdir()
    line = _error(capsys, "verify", tmp_path / "empty")
    assert "is empty" in line and "pass a step directory" in line and "run's checkpoint directory" in line
    line = _error(capsys, "inspect", runs["root"])
    assert f"runs' checkpoint directories: {runs['gpt_run']}, {run}: pass one of those" in line
    no_latest = shutil.copytree(run, tmp_path / "no_latest")
    (no_latest / "latest").unlink()
    line = _error(capsys, "consolidate", no_latest, "--out", tmp_path / "full")
    assert "no `latest`" in line and "--step N (available: 1, 2)" in line
    line = _error(capsys, "verify", run / "step-000001", "--step", "2")
    assert "leave out --step" in line and f"{run} with --step 2" in line
    assert not (tmp_path / "x").exists() and not (tmp_path / "full").exists()


def test_a_run_with_a_recorded_base_resumes(runs, tmp_path, pool2):
    """The resumed run rebuilds its LoraConfig from adapter_config.json, which now also holds
    base_model_name_or_path; the new step records the base again."""
    run = shutil.copytree(runs["run"], tmp_path / "run")
    results = pool2.run(train_job, ["parallel.tensor=2", "optim.steps=3", "checkpoint.save_every=1",
                                    f"model.hf_checkpoint={runs['hf']}", "data.tokenizer=byte",
                                    f"checkpoint.directory={run}"])
    assert results[0]["start_step"] == 2 and results[0]["resumed_from"] == str(run / "step-000002")
    assert (run / "step-000003" / "hf_config.json").read_bytes() == (runs["hf"] / "config.json").read_bytes()


def test_an_out_inside_the_run_directory_is_still_refused(runs, capsys):
    run = runs["run"]
    before = _digests(run)
    for command in (["export"], ["consolidate"], ["merge"]):
        line = _error(capsys, *command, run, "--out", run / "step-000003")
        assert "lies inside the run's checkpoint directory" in line
    assert _digests(run) == before


def test_an_older_checkpoint_works_with_the_flags_and_asks_for_them(runs, tmp_path, capsys):
    hf = runs["hf"]
    old = shutil.copytree(runs["run"] / "step-000002", tmp_path / "old" / "step-000002")
    _rewrite(old, drop_hf_config=True, edit_config=lambda c: c.pop("base_model_name_or_path"))
    line = _error(capsys, "export", old, "--out", tmp_path / "peft")
    assert "does not record its base model's config" in line and "pass --hf-config" in line
    line = _error(capsys, "merge", old, "--out", tmp_path / "merged")
    assert "does not record its base model" in line and "pass --base" in line
    assert "not recorded" in _ok(capsys, "inspect", old)[0]
    _ok(capsys, "export", old, "--out", tmp_path / "peft", "--hf-config", hf)
    _ok(capsys, "export", runs["run"], "--out", tmp_path / "peft_new")
    assert _digests(tmp_path / "peft") == _digests(tmp_path / "peft_new")
    _ok(capsys, "merge", old, "--base", hf, "--out", tmp_path / "merged")
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_a_moved_base_is_named(runs, tmp_path, capsys):
    moved = shutil.copytree(runs["run"] / "step-000002", tmp_path / "moved" / "step-000002")
    _rewrite(moved, edit_config=lambda c: c.update(base_model_name_or_path=str(tmp_path / "gone")))
    line = _error(capsys, "merge", moved, "--out", tmp_path / "merged")
    assert f"trained on the base {tmp_path / 'gone'}, which no longer exists" in line and "pass --base" in line
    _ok(capsys, "merge", moved, "--base", runs["hf"], "--out", tmp_path / "merged")


def test_a_run_built_from_gpt_settings_exports_without_flags(runs, tmp_path, capsys):
    run = runs["gpt_run"]
    config = json.loads((run / "step-000002" / "hf_config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("llama", 2, 64)
    assert "base_model_name_or_path" not in json.loads((run / "step-000002" / "adapter_config.json").read_text())
    assert "built from GPT settings" in _ok(capsys, "inspect", run)[0]
    _ok(capsys, "export", run, "--out", tmp_path / "peft")
    for name in ("adapter_model.safetensors", "adapter_config.json"):  # the run's own export (train/finish.py)
        assert (tmp_path / "peft" / name).read_bytes() == (runs["gpt_peft"] / name).read_bytes(), name
    line = _error(capsys, "merge", run, "--out", tmp_path / "merged")
    assert "built from GPT settings" in line and "pass --base" in line
