"""A failure on one rank becomes the same error on every rank, never a hang.

A rank that raises on its own leaves the others waiting in their next collective until the
timeout.  So local work that may fail is followed by one collective decision (did every rank
succeed?); only if some rank failed, one more gathers the messages, and every rank raises the same
error listing them:

    <what> failed:
      rank 1: OSError: [Errno 28] No space left on device
      rank 3: ...

`group=None` is the whole world, as in collectives.py (which makes every call here).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, TypeVar

from parallel_adapters.distributed.collectives import all_gather_objects, all_ranks_agree, group_rank

T = TypeVar("T")


def raise_listed(errors: Iterable[str | None], what: str, *, error_type: type[Exception] = RuntimeError) -> None:
    """Raise one `error_type` listing the errors (deduplicated, in order), if there are any.  Not
    collective: every rank calls it with the same gathered list, so all raise together."""
    errors = list(dict.fromkeys(e for e in errors if e))
    if errors:
        raise error_type(f"{what} failed:\n  " + "\n  ".join(errors))


def raise_together(error: str | None, what: str, group: Any = None, *, error_type: type[Exception] = RuntimeError,
                   cleanup: Callable[[], None] | None = None) -> None:
    """Collective: if any rank of `group` has an error, every rank raises one `error_type` listing
    them all (after `cleanup`, where given).  Costs one small all-reduce when every rank succeeded."""
    if all_ranks_agree(error is None, group):
        return
    errors = all_gather_objects(error, group)
    if cleanup is not None:
        cleanup()
    raise_listed(errors, what, error_type=error_type)


def agreed(fn: Callable[[], T], what: str, group: Any = None) -> T:
    """fn() on every rank; if it fails on any rank, every rank raises a RuntimeError naming each
    failed rank and its error (never one rank raising while the others wait in a collective)."""
    out, error = None, None
    try:
        out = fn()
    except Exception as exc:  # noqa: BLE001 - reported on every rank by raise_together
        error = f"rank {group_rank(None)}: {type(exc).__name__}: {exc}"
    raise_together(error, what, group)
    return out


def on_rank0(fn: Callable[[], T], what: str) -> T:
    """fn() on world rank 0 only; its result (or its error, raised as a RuntimeError on every rank)
    reaches all ranks.  One gather of a small picklable result."""
    out, error = None, None
    if group_rank(None) == 0:
        try:
            out = fn()
        except Exception as exc:  # noqa: BLE001 - reported on every rank below
            error = f"{type(exc).__name__}: {exc}"
    out, error = all_gather_objects((out, error), None)[0]
    if error:
        raise RuntimeError(f"{what} failed on rank 0: {error}")
    return out
