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
from parallel_adapters.user_errors import UserError, describe, every_rank

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


def _failure(exc: Exception, rank: int | None) -> tuple[str, bool]:
    """(the message naming the rank, whether it is the user's error: see user_errors.describe)."""
    where = f"rank {rank}: " if rank is not None else ""
    found = describe(exc)
    if found is not None and found[1] == 2:
        return f"{where}{found[0]}", True
    return f"{where}{type(exc).__name__}: {exc}", False


def _raise_failures(failures: list[tuple[str, bool]], what: str, suffix: str = "") -> None:
    """Every rank raises the same error: a UserError (one line, every_rank) when each failure is the
    user's, else a RuntimeError listing them (a bug keeps its traceback on the failing rank's log)."""
    if failures and all(user for _, user in failures):
        messages = list(dict.fromkeys(m for m, _ in failures))
        raise every_rank(UserError(f"{what} failed{suffix}: " + "; ".join(messages)))
    if suffix:
        raise RuntimeError(f"{what} failed{suffix}: " + "; ".join(m for m, _ in failures))
    raise_listed([m for m, _ in failures], what)


def agreed(fn: Callable[[], T], what: str, group: Any = None) -> T:
    """fn() on every rank; if it fails on any rank, every rank raises the same error naming each
    failed rank and its error (never one rank raising while the others wait in a collective)."""
    out, failure = None, None
    try:
        out = fn()
    except Exception as exc:  # noqa: BLE001 - reported on every rank below
        failure = _failure(exc, group_rank(None))
    if all_ranks_agree(failure is None, group):
        return out
    _raise_failures([f for f in all_gather_objects(failure, group) if f], what)
    return out


def on_rank0(fn: Callable[[], T], what: str) -> T:
    """fn() on world rank 0 only; its result (or its error, raised on every rank) reaches all
    ranks.  One gather of a small picklable result."""
    out, failure = None, None
    if group_rank(None) == 0:
        try:
            out = fn()
        except Exception as exc:  # noqa: BLE001 - reported on every rank below
            failure = _failure(exc, None)
    out, failure = all_gather_objects((out, failure), None)[0]
    if failure:
        _raise_failures([failure], what, " on rank 0")
    return out
