"""Before a run trains: its outputs cannot destroy anything, and it owns its checkpoint directory.

World rank 0 (the only writer of `latest`, the pruner and the exporter) checks, before any model
is built:

- `checkpoint.directory` is not, does not contain and does not lie inside an input (the HF base,
  a data file); it is new, empty, or a run's checkpoint directory (never an HF model directory, a
  checkpoint step, or unrelated files);
- `export.peft_dir` (and the HF base that `verify_with_peft` writes beside it without
  `model.hf_checkpoint`) is a safe output as `checkpoint.outputs` defines it;
- it takes the directory's `RunLock`, cleans up what killed saves left, and a fresh run refuses a
  directory holding checkpoints unless `--overwrite` (then they are deleted: the user asked).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

from parallel_adapters.checkpoint.layout import CONFIG_FILE, EXTRA_STATE_FILE, INDEX_FILE, LATEST_FILE
from parallel_adapters.checkpoint.locate import list_checkpoints, locate_checkpoint, resolve_latest
from parallel_adapters.checkpoint.outputs import (
    OUTPUT_MARKER, check_inputs_apart, check_output_dir, is_hf_model_dir, mark_output, output_command,
)
from parallel_adapters.checkpoint.run_lock import RunLock
from parallel_adapters.distributed.collectives import all_gather_objects
from parallel_adapters.train.run_config import RunConfig
from parallel_adapters.user_errors import UserError

RUN_COMMAND = "train"
CHECKED_KEY = "finite_checked"
"""extra_state key: the step's loss and gradient norm were finite, and the save checked its tensors."""
HF_BASE_SUFFIX = "-hf-base"


def run_inputs(config: RunConfig) -> list[tuple[str, str | None]]:
    return [("model.hf_checkpoint", config.model.hf_checkpoint),
            *((f"data.paths[{i}]", p) for i, p in enumerate(config.data.paths))]


def _check_checkpoint_directory(config: RunConfig) -> Path:
    flag = "checkpoint.directory"
    directory = config.checkpoint.directory
    target = check_inputs_apart(directory, RUN_COMMAND, run_inputs(config), flag)
    if target.exists() and not target.is_dir():
        raise UserError(f"{flag} {directory} is a file, not a directory")
    if not target.exists() or not any(target.iterdir()):
        return target
    if is_hf_model_dir(target) or (target / INDEX_FILE).exists() or (target / CONFIG_FILE).exists():
        what = "a Hugging Face model directory" if is_hf_model_dir(target) else "a checkpoint step or an adapter"
        raise UserError(f"{flag} {directory} is {what}, not a run's checkpoint directory: choose a new directory")
    command = output_command(target)
    if command == RUN_COMMAND or (command is None and _looks_like_run_directory(target)):
        return target
    raise UserError(f"{flag} {directory} is not empty and is not a run's checkpoint directory"
                    + (f" (it holds a `{command}` output)" if command else "") + ": choose a new or empty directory")


def _looks_like_run_directory(target: Path) -> bool:
    return (target / LATEST_FILE).is_file() or bool(list_checkpoints(target))


def check_run_outputs(config: RunConfig, overwrite: bool) -> None:
    """Every output of the run is safe to write (see the module doc).  No side effects."""
    if config.checkpoint.directory is not None:
        _check_checkpoint_directory(config)
    peft_dir = config.export.peft_dir
    if peft_dir is None:
        return
    inputs = [*run_inputs(config), ("checkpoint.directory", config.checkpoint.directory)]
    check_output_dir(peft_dir, "export", inputs, overwrite, flag="export.peft_dir")
    if config.export.verify_with_peft and config.model.hf_checkpoint is None:
        hf_base = Path(peft_dir).with_name(Path(peft_dir).name + HF_BASE_SUFFIX)
        check_output_dir(hf_base, "hf-base", inputs, overwrite, flag="the HF base written beside export.peft_dir")


def hold_checkpoint_directory(config: RunConfig, fresh: bool, overwrite: bool) -> RunLock | None:
    """Lock checkpoint.directory for this run (world rank 0) after `check_run_outputs`; a fresh
    run refuses a directory with checkpoints unless `overwrite`, which deletes them."""
    check_run_outputs(config, overwrite)
    if config.checkpoint.directory is None:
        return None
    directory = Path(config.checkpoint.directory)
    lock = RunLock(directory).acquire()
    try:
        steps = list_checkpoints(directory)
        if fresh and steps:
            if not overwrite:
                raise UserError(
                    f"checkpoint.directory {directory} holds checkpoints of an earlier run (up to {steps[-1][1].name}); "
                    "resume it (leave out --no-resume), pass --overwrite to start afresh and delete them, or choose "
                    "a new checkpoint.directory")
            (directory / LATEST_FILE).unlink(missing_ok=True)
            for _, path in steps:
                shutil.rmtree(path)
        if not (directory / OUTPUT_MARKER).exists():
            mark_output(directory, RUN_COMMAND)
    except BaseException:
        lock.release()
        raise
    return lock


def passed_checks(step_dir: Path) -> bool:
    """Whether the step was saved by a run that checked it (finite loss, gradients and tensors)."""
    try:
        extra = json.loads((step_dir / EXTRA_STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(extra, dict) and extra.get(CHECKED_KEY) is True


def prune_checkpoints(parent: Path, keep_last: int, protect: Callable[[Path], bool] | None = None) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints; never the one `latest` names, nor the
    newest one that `passed_checks`.  World rank 0 only: it is the only writer of `latest`."""
    latest = (parent / "latest").read_text().strip() if (parent / "latest").is_file() else None
    steps = list_checkpoints(parent)
    last_good = next((path for _, path in reversed(steps) if passed_checks(path)), None)
    removed = []
    for _, path in steps[:-keep_last] if keep_last > 0 else []:
        if path.name == latest or path == last_good or (protect is not None and protect(path)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def resolve_resume(config: RunConfig, resume: bool | str | Path | None) -> Path | None:
    """None: resume from checkpoint.directory's `latest` if there is one; True: must resume;
    False: never; a path: that checkpoint (or that parent's latest).  Collective: every rank
    takes world rank 0's answer."""
    found: Path | None = None
    if isinstance(resume, (str, Path)):
        found = locate_checkpoint(resume).directory  # a step, or a run directory's `latest`
    elif resume is not False:
        directory = config.checkpoint.directory
        if directory is None and resume is True:
            raise ValueError("resume requested, but checkpoint.directory is not set")
        found = resolve_latest(directory) if directory is not None else None
        if found is None and resume is True:
            raise ValueError(f"resume requested, but {directory} has no `latest` checkpoint")
    agreed = all_gather_objects(None if found is None else str(found.absolute()), None)[0]
    return None if agreed is None else Path(agreed)
