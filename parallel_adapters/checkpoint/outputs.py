"""Where a command may write: outputs never destroy inputs or unrelated data.

Every command that writes a directory (consolidate, export, merge, train's checkpoint and export
directories) or a file (evaluate) checks its output first, before it reads or computes anything:

- the output must not be, contain or lie inside any input (a checkpoint, its run directory, an HF
  base, a token file), following symlinks;
- an existing output must be empty, or a previous output of the same command (it carries
  `OUTPUT_MARKER`) and `--overwrite` must be given;
- a Hugging Face model directory is never an output (unless it is a previous merge and
  `--overwrite` is given).

`StagedDirectory` then writes into a hidden sibling and renames it into place at the end; on any
failure it removes the sibling and every parent directory it created.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Iterable, Sequence

from parallel_adapters.checkpoint.files import fsync_path, write_text_atomic
from parallel_adapters.checkpoint.layout import INDEX_FILE, LATEST_FILE, OLD_MARKER, TMP_MARKER
from parallel_adapters.user_errors import UserError

OUTPUT_MARKER = ".parallel-adapters-output.json"
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json")


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def _related(out: Path, other: Path) -> str | None:
    """How `out` overlaps `other` ('is', 'contains', 'lies inside'), or None."""
    if out == other:
        return "is"
    if out in other.parents:
        return "contains"
    if other in out.parents:
        return "lies inside"
    return None


RUN_DIRECTORY = "run's checkpoint directory"
_STEP_NAME = re.compile(r"^step-\d+$")


def checkpoint_inputs(checkpoint: str | Path) -> list[tuple[str, Path]]:
    """(what, path) of a checkpoint directory and, when it is a step of a run, of the run's
    checkpoint directory (every step and `latest` there are the user's data too)."""
    step = Path(checkpoint)
    parent = step.absolute().parent
    if (parent / LATEST_FILE).is_file() or any(parent.glob("step-*/" + INDEX_FILE)):
        return [("checkpoint", step), (RUN_DIRECTORY, parent)]
    return [("checkpoint", step)]


def is_hf_model_dir(directory: Path) -> bool:
    return (directory / "config.json").is_file() and any((directory / f).exists() for f in _HF_WEIGHTS)


def output_command(directory: Path) -> str | None:
    """The command whose output `directory` is (from its marker), or None."""
    try:
        return json.loads((directory / OUTPUT_MARKER).read_text(encoding="utf-8")).get("command")
    except (OSError, ValueError, AttributeError):
        return None


def check_inputs_apart(out: str | Path, command: str, inputs: Iterable[tuple[str, str | Path | None]],
                       flag: str = "--out") -> Path:
    """`out`, resolved; UserError if it is, contains or lies inside an input ((what, path) pairs)."""
    target = _resolved(out)
    for what, path in inputs:
        if path is None:
            continue
        relation = _related(target, _resolved(path))
        if relation == "lies inside" and what == RUN_DIRECTORY and not _claimed_by_runs(target, _resolved(path)):
            continue  # a new sibling of the steps, not named like one: the run never touches it
        if relation is not None:
            raise UserError(f"{command}: {flag} {out} {relation} the {what} {path}; "
                            f"writing there would overwrite your input: choose another {flag}")
    return target


def _claimed_by_runs(target: Path, run_directory: Path) -> bool:
    """Whether a path inside a run's checkpoint directory is one a run writes, prunes or reads."""
    top = target.relative_to(run_directory).parts[0]
    return bool(_STEP_NAME.match(top)) or top == LATEST_FILE or top.startswith(".")


def check_output_dir(out: str | Path, command: str, inputs: Iterable[tuple[str, str | Path | None]] = (),
                     overwrite: bool = False, flag: str = "--out") -> Path:
    """Refuse an output directory that would destroy data (see the module doc); the resolved path."""
    target = check_inputs_apart(out, command, inputs, flag)
    if target.exists() and not target.is_dir():
        raise UserError(f"{command}: {flag} {out} is a file, not a directory: choose a new directory")
    if not target.exists() or not any(target.iterdir()):
        return target
    ours = output_command(target) == command
    if ours and overwrite:
        return target
    if ours:
        raise UserError(f"{command}: {flag} {out} holds a previous {command} output: pass --overwrite to "
                        "replace it, or choose a new directory")
    what = "a Hugging Face model directory" if is_hf_model_dir(target) else "not empty"
    raise UserError(f"{command}: {flag} {out} is {what} and not an output of `parallel-adapters {command}`: "
                    f"choose a new or empty directory (--overwrite only replaces a previous {command} output)")


def check_output_file(out: str | Path, command: str, inputs: Iterable[tuple[str, str | Path | None]] = (),
                      overwrite: bool = False, is_ours=lambda path: False, flag: str = "--out") -> Path:
    """Refuse an output file that is a directory, an input, or an existing file that `is_ours`
    does not recognise as a previous output (or is one, without --overwrite)."""
    target = check_inputs_apart(out, command, inputs, flag)
    if target.is_dir():
        raise UserError(f"{command}: {flag} {out} is a directory: name a file")
    if not target.exists():
        return target
    if not is_ours(target):
        raise UserError(f"{command}: {flag} {out} exists and is not an output of `parallel-adapters {command}`: "
                        "choose a new file name")
    if not overwrite:
        raise UserError(f"{command}: {flag} {out} holds a previous {command} output: pass --overwrite to "
                        "replace it, or choose a new file name")
    return target


def mark_output(directory: Path, command: str) -> None:
    write_text_atomic(directory / OUTPUT_MARKER, json.dumps({"command": command}) + "\n")


def make_parents(path: Path) -> list[Path]:
    """mkdir -p of `path`'s parent; the directories created, outermost first."""
    missing = [p for p in reversed(path.parents) if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    return missing


def remove_created(directories: Sequence[Path]) -> None:
    """Remove directories `make_parents` created, innermost first, if they are still empty."""
    for directory in reversed(directories):
        try:
            directory.rmdir()
        except OSError:
            return


def swap_into_place(tmp: Path, final: Path) -> None:
    """rename tmp -> final; an existing final is moved aside first and deleted only afterwards."""
    old = None
    if final.exists():
        old = final.parent / f".{final.name}{OLD_MARKER}{uuid.uuid4().hex[:12]}"
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except OSError:
        if old is not None:
            os.rename(old, final)
        raise
    fsync_path(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class StagedDirectory:
    """Write a directory output atomically::

        with StagedDirectory(out, "export") as tmp:   # a hidden sibling of `out`
            ... write files into tmp ...
        # here `out` holds exactly what was written (an old output was replaced), with the marker

    On an exception the sibling and every parent directory created for it are removed, and an
    existing `out` is left as it was."""

    def __init__(self, out: Path, command: str) -> None:
        self.out = Path(out).absolute()
        self.command = command
        self.tmp = self.out.parent / f".{self.out.name}{TMP_MARKER}{uuid.uuid4().hex[:12]}"
        self._created: list[Path] = []

    def __enter__(self) -> Path:
        self._created = make_parents(self.tmp)
        try:
            self.tmp.mkdir()
        except BaseException:
            remove_created(self._created)
            raise
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                (self.tmp / OUTPUT_MARKER).write_text(json.dumps({"command": self.command}) + "\n",
                                                      encoding="utf-8")
                swap_into_place(self.tmp, self.out)
                return
            except BaseException:
                self._discard()
                raise
        self._discard()

    def _discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        remove_created(self._created)
