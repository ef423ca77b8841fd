"""Finding a checkpoint from what the user has (pure path logic: no torch, no index parsing).

A run's checkpoint directory (`checkpoint.directory`) holds one directory per save and a pointer::

    <run>/step-000020/index.json ...      CHECKPOINT_NAME, complete once index.json exists
    <run>/step-000040/index.json ...
    <run>/latest                          "step-000040": the newest complete save

`locate_checkpoint` takes either a step directory or a run's checkpoint directory (then its
`latest`, or `step` when given) and says which one it chose; its errors name what to pass
instead.  Training (resume, pruning) and the offline commands share these helpers.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from parallel_adapters.checkpoint.layout import INDEX_FILE, LATEST_FILE, OLD_MARKER, CheckpointError
from parallel_adapters.storage.paths import check_plain_name

CHECKPOINT_NAME = "step-{step:06d}"
_CHECKPOINT_RE = re.compile(r"^step-(\d{6,})$")
STEP_FLAG = "--step"


def list_checkpoints(parent: str | Path) -> list[tuple[int, Path]]:
    """(step, directory) of the step-NNNNNN directories under `parent`, oldest first (complete or
    not: a directory only becomes one by the rename that publishes a save)."""
    found = []
    for child in Path(parent).iterdir() if Path(parent).is_dir() else []:
        match = _CHECKPOINT_RE.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def complete_checkpoints(parent: str | Path) -> list[tuple[int, Path]]:
    """`list_checkpoints` restricted to the complete saves (their index.json exists)."""
    return [(step, path) for step, path in list_checkpoints(parent) if (path / INDEX_FILE).is_file()]


def resolve_latest(parent_dir: str | Path) -> Path | None:
    """The checkpoint `<parent>/latest` names, or None if no save has completed yet."""
    parent = Path(parent_dir)
    pointer = parent / LATEST_FILE
    if not pointer.is_file():
        return None
    name = check_plain_name(pointer.read_text(encoding="utf-8").strip(), str(pointer))
    target = parent / name
    if not (target / INDEX_FILE).is_file():
        leftovers = sorted(p.name for p in parent.glob(f".{name}{OLD_MARKER}*"))
        raise CheckpointError(f"{pointer} names {name!r}, but {target} is not a complete checkpoint"
                              + (f" (an interrupted replace left {leftovers})" if leftovers else "")
                              + _alternatives(parent, complete_checkpoints(parent)))
    return target


@dataclass(frozen=True)
class Located:
    """A checkpoint step directory and how it was found (None: it was given as such)."""

    directory: Path
    chosen_by: str | None = None

    def describe(self) -> str:
        """One line for the user: which step a command works on, and why."""
        return f"using {self.directory}" + (f" ({self.chosen_by})" if self.chosen_by else "")


def locate_checkpoint(path: str | Path, step: int | None = None) -> Located:
    """The step directory `path` means: `path` itself when it holds index.json; for a run's
    checkpoint directory, `step`'s directory when given, else the one `latest` names.
    CheckpointError naming the alternatives (the steps there, a run directory one level down)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a checkpoint directory")
    if step is not None and (type(step) is not int or step < 0):
        raise CheckpointError(f"{STEP_FLAG} must be a non-negative integer, got {step!r}")
    if (path / INDEX_FILE).is_file():
        if step is None or _step_of(path) == step:
            return Located(path)
        raise CheckpointError(f"{STEP_FLAG} {step}: {path} is itself one checkpoint (a step directory); leave out "
                              f"{STEP_FLAG}, or pass the run's checkpoint directory {path.parent} with {STEP_FLAG} {step}")
    steps = complete_checkpoints(path)
    if step is not None:
        target = path / CHECKPOINT_NAME.format(step=step)
        if (target / INDEX_FILE).is_file():
            return Located(target, f"{STEP_FLAG} {step}")
        state = "is incomplete (no index.json)" if target.exists() else "does not exist"
        raise CheckpointError(f"{STEP_FLAG} {step}: {target} {state}" + _alternatives(path, steps))
    latest = resolve_latest(path)
    if latest is not None:
        return Located(latest, f"named by {path / LATEST_FILE}")
    raise CheckpointError(_nothing_here(path, steps))


def _step_of(directory: Path) -> int | None:
    match = _CHECKPOINT_RE.match(directory.name)
    return int(match.group(1)) if match else None


def _alternatives(run: Path, steps: list[tuple[int, Path]]) -> str:
    """'; pass ...' naming the complete steps of a run directory (or saying there are none)."""
    if not steps:
        return f"; {run} holds no complete checkpoint (no step-NNNNNN directory with an index.json)"
    shown = [str(s) for s, _ in steps[-12:]]
    more = f"{len(steps) - len(shown)} earlier, " if len(steps) > len(shown) else ""
    return (f"; pass a step directory such as {steps[-1][1]}, or {STEP_FLAG} N "
            f"(available: {more}{', '.join(shown)})")


def _nothing_here(path: Path, steps: list[tuple[int, Path]]) -> str:
    if steps:
        return f"{path} holds no checkpoint itself and no `{LATEST_FILE}`" + _alternatives(path, steps)
    runs = sorted(child for child in path.iterdir() if child.is_dir() and complete_checkpoints(child))
    if len(runs) == 1:
        return f"{path} holds no checkpoint, but {runs[0]} is a run's checkpoint directory: pass that"
    if runs:
        return (f"{path} holds no checkpoint, but these are runs' checkpoint directories: "
                f"{', '.join(map(str, runs[:6]))}: pass one of those")
    if any(path.iterdir()):
        return (f"{path / INDEX_FILE} is missing: {path} is an incomplete save or not a checkpoint; pass a step "
                "directory (with an index.json) or a run's checkpoint directory (with `latest` or step-NNNNNN "
                f"directories, then {STEP_FLAG} N picks one)")
    return (f"{path} is empty: it holds no checkpoint; pass a step directory (with an index.json) or a run's "
            "checkpoint directory (checkpoint.directory of the run config)")
