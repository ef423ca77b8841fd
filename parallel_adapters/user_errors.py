"""Errors the user can fix, and how the command line reports them: one line, exit code 2.

A `ValueError` (and its subclasses: `UserError`, `CheckpointError`, config errors) means bad input.
An `OSError` that names a file (permissions, a full disk, a path that is a file) is the user's
environment, not a bug.  Anything else is a bug and keeps its traceback.  Under torchrun an error
that every rank raised alike (`every_rank`) is printed by rank 0 only.
"""
from __future__ import annotations

import errno
import os
import sys
from typing import Callable, NoReturn, TypeVar

T = TypeVar("T")
USER_ERROR_EXIT = 2
RUN_FAILED_EXIT = 1

_HINTS = {
    errno.ENOSPC: "the disk is full: free space or write somewhere else",
    errno.EDQUOT: "the disk quota is exhausted: free space or write somewhere else",
    errno.EACCES: "permission denied: choose a path you can write, or fix its permissions",
    errno.EPERM: "operation not permitted: choose another path",
    errno.EROFS: "the file system is read-only: write somewhere else",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.EISDIR: "the path is a directory, a file was expected",
    errno.ENOENT: "no such file or directory",
    errno.EEXIST: "the path exists already",
}


class UserError(ValueError):
    """Bad input: a path, a value, a file's content.  The message names it and what to do."""


class RunFailed(RuntimeError):
    """A run that started and then had to stop (e.g. a non-finite loss): exit code 1, one line."""


def every_rank(exc: BaseException) -> BaseException:
    """Mark `exc` as raised alike on every rank (so only rank 0 prints it); returns it."""
    exc.every_rank = True  # type: ignore[attr-defined]
    return exc


def alike_on_every_rank(fn: Callable[[], T]) -> T:
    """fn(), whose user errors every rank raises alike (config and input checks that read the same
    files): they are marked `every_rank`, so that under torchrun only rank 0 prints them."""
    try:
        return fn()
    except ValueError as exc:
        raise every_rank(exc)


def os_error_message(exc: OSError) -> str:
    """'PATH: what happened (hint)' for an OSError, naming its file(s)."""
    paths = [p for p in (exc.filename, exc.filename2) if p is not None]
    where = " -> ".join(str(os.fsdecode(p)) for p in paths)
    what = exc.strerror or str(exc)
    hint = _HINTS.get(exc.errno or -1)
    text = f"{where}: {what}" if where else what
    return f"{text} ({hint})" if hint and hint.lower() != what.lower() else text


def describe(exc: BaseException) -> tuple[str, int] | None:
    """(one-line message, exit code) for an error the user can fix, or None for a bug."""
    if isinstance(exc, RunFailed):
        return str(exc), RUN_FAILED_EXIT
    if isinstance(exc, ValueError):
        return str(exc), USER_ERROR_EXIT
    if isinstance(exc, OSError) and (exc.filename is not None or exc.errno in _HINTS):
        return os_error_message(exc), USER_ERROR_EXIT
    return None


def _world_rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def run_command(command: str, fn: Callable[[], T]) -> T:
    """fn(); a user error becomes one line on stderr and SystemExit(2) (1 for a failed run)."""
    try:
        return fn()
    except (ValueError, OSError, RunFailed) as exc:
        found = describe(exc)
        if found is None:
            raise
        _exit(command, exc, *found)


def _exit(command: str, exc: BaseException, message: str, code: int) -> NoReturn:
    if _world_rank() == 0 or not getattr(exc, "every_rank", False):
        prefix = f"[rank {_world_rank()}] " if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else ""
        print(f"{prefix}parallel-adapters {command}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code) from None
