"""Counting wrappers around ``torch.distributed`` collectives (test-only).

``install()`` replaces the collective functions in both ``torch.distributed`` and
``torch.distributed.distributed_c10d`` with thin wrappers that count calls and payload
bytes, then delegate to the original.  It must run BEFORE megatron is imported: megatron
binds e.g. ``dist_all_gather_func = torch.distributed.all_gather_into_tensor`` at import
time, and only a wrapper that is already in place gets bound.  The harness workers
(``tests.harness.worker``) call ``install()`` first thing, so inside a pool job::

    from tests.harness import counting

    with counting.counted() as c:
        torch.distributed.all_reduce(t)
    assert c.calls == {"all_reduce": 1}
    assert c.bytes["all_reduce"] == t.numel() * t.element_size()

Counters are per process, cumulative, always on, and reset by the worker at the start
of every pool job (so ``snapshot()`` inside a job is per job).

Bytes = payload size (``numel * element_size``) of the tensors this rank passes in:

==============================================  ==========================================
all_reduce, reduce, broadcast, send, recv,      the ``tensor`` argument (recv/irecv: the
isend, irecv, gather                            receive buffer)
all_gather                                      the input ``tensor`` (not the list)
all_gather_into_tensor, _all_gather_base,       the input tensor
all_gather_single, reduce_scatter_tensor,
_reduce_scatter_base, reduce_scatter_single,
all_to_all_single
reduce_scatter, all_to_all,                     sum of the input tensor list
all_gather_coalesced, all_reduce_coalesced,
reduce_scatter_tensor_coalesced
scatter                                         sum of ``scatter_list`` (0 on non-src ranks)
batch_isend_irecv                               sum of all ``P2POp.tensor`` (sends + recvs)
barrier, monitored_barrier                      0
*_object collectives                            best effort: the bytes of the tensor
                                                collectives they issue internally
==============================================  ==========================================

Nested calls are counted once: a reentrancy guard makes only the outermost patched call
count (``all_gather_object`` -> internal ``all_gather`` counts as one
``all_gather_object``; ``send`` -> internal ``isend`` counts as one ``send``; in torch
2.13 ``all_gather_into_tensor``/``_all_gather_base`` delegate to ``all_gather_single``
and ``reduce_scatter_tensor``/``_reduce_scatter_base`` to ``reduce_scatter_single``:
each counts under the name that was called).

Both ``torch.distributed.X`` and ``torch.distributed.distributed_c10d.X`` are replaced by
the same wrapper, so identity checks inside torch (``P2POp`` accepting only
``isend``/``irecv``, ``_coalescing_manager`` dispatching on ``all_gather_single``) still
hold.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import math
import sys
import threading
import warnings
from typing import Any, Callable, Iterator

__all__ = ["COUNTED_NAMES", "install", "installed", "reset", "snapshot", "counted", "Counted", "received", "numels"]


def _nbytes(t: Any) -> int:
    try:
        return int(t.numel()) * int(t.element_size())
    except Exception:  # not a tensor
        return 0


def _sum(ts: Any) -> int:
    if ts is None:
        return 0
    try:
        return sum(_nbytes(t) for t in ts)
    except TypeError:
        return _nbytes(ts)


def _arg(args: tuple, kwargs: dict, idx: int, name: str) -> Any:
    if len(args) > idx:
        return args[idx]
    return kwargs.get(name)


def _tensor_at(idx: int, name: str) -> Callable[[tuple, dict], int]:
    return lambda a, k: _nbytes(_arg(a, k, idx, name))


def _list_at(idx: int, name: str) -> Callable[[tuple, dict], int]:
    return lambda a, k: _sum(_arg(a, k, idx, name))


def _batch_p2p(a: tuple, k: dict) -> int:
    ops = _arg(a, k, 0, "p2p_op_list") or ()
    return sum(_nbytes(getattr(op, "tensor", None)) for op in ops)


def _zero(a: tuple, k: dict) -> int:
    return 0


# name -> sizer(args, kwargs) -> bytes.  ``None`` = object collective (bytes accumulated
# from the tensor collectives it issues internally).
_SIZERS: dict[str, Callable[[tuple, dict], int] | None] = {
    "all_reduce": _tensor_at(0, "tensor"),
    "all_gather": _tensor_at(1, "tensor"),
    "all_gather_into_tensor": _tensor_at(1, "input_tensor"),
    "all_gather_single": _tensor_at(1, "input_tensor"),  # torch >= 2.13 spelling
    "_all_gather_base": _tensor_at(1, "input_tensor"),
    "all_gather_object": None,
    "reduce_scatter": _list_at(1, "input_list"),
    "reduce_scatter_tensor": _tensor_at(1, "input"),
    "reduce_scatter_single": _tensor_at(1, "input"),  # torch >= 2.13 spelling
    "_reduce_scatter_base": _tensor_at(1, "input"),
    "all_reduce_coalesced": _list_at(0, "tensors"),
    "all_gather_coalesced": _list_at(1, "input_tensor_list"),
    "reduce_scatter_tensor_coalesced": _list_at(1, "inputs"),
    "all_to_all": _list_at(1, "input_tensor_list"),
    "all_to_all_single": _tensor_at(1, "input"),
    "broadcast": _tensor_at(0, "tensor"),
    "broadcast_object_list": None,
    "barrier": _zero,
    "monitored_barrier": _zero,
    "send": _tensor_at(0, "tensor"),
    "recv": _tensor_at(0, "tensor"),
    "isend": _tensor_at(0, "tensor"),
    "irecv": _tensor_at(0, "tensor"),
    "batch_isend_irecv": _batch_p2p,
    "reduce": _tensor_at(0, "tensor"),
    "gather": _tensor_at(0, "tensor"),
    "scatter": _list_at(1, "scatter_list"),
    "gather_object": None,
    "scatter_object_list": None,
    "send_object_list": None,
    "recv_object_list": None,
}

#: Names that ``install()`` wraps where torch has them (filled in by ``install()``).
COUNTED_NAMES: tuple[str, ...] = ()

_calls: dict[str, int] = collections.defaultdict(int)
_bytes: dict[str, int] = collections.defaultdict(int)
_tls = threading.local()  # .depth: nesting level; .acc: [bytes] of an outer object collective
_install_lock = threading.Lock()
_MARK = "_pa_counting_original"


def _make_wrapper(name: str, orig: Callable, sizer: Callable | None) -> Callable:
    @functools.wraps(orig)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        depth = getattr(_tls, "depth", 0)
        if depth:
            # Nested inside another counted call: do not count; only feed the bytes of
            # direct children to an outer object collective.
            acc = _tls.acc
            if acc is not None and depth == 1 and sizer is not None:
                try:
                    acc[0] += sizer(args, kwargs)
                except Exception:
                    pass
            _tls.depth = depth + 1
            try:
                return orig(*args, **kwargs)
            finally:
                _tls.depth = depth
        _calls[name] += 1
        acc = None
        if sizer is None:
            acc = [0]
        else:
            try:
                _bytes[name] += sizer(args, kwargs)
            except Exception:
                pass
        _tls.depth = 1
        _tls.acc = acc
        try:
            return orig(*args, **kwargs)
        finally:
            _tls.depth = 0
            _tls.acc = None
            if acc is not None:
                _bytes[name] += acc[0]

    setattr(wrapper, _MARK, orig)
    return wrapper


def installed() -> bool:
    """True when the counting wrappers are in place in this process."""
    return bool(COUNTED_NAMES)


def install() -> tuple[str, ...]:
    """Wrap the collectives (idempotent). Returns the tuple of names counted."""
    global COUNTED_NAMES
    with _install_lock:
        if COUNTED_NAMES:
            return COUNTED_NAMES
        if any(m == "megatron" or m.startswith("megatron.") for m in sys.modules):
            warnings.warn(
                "tests.harness.counting.install() called after megatron was imported: "
                "functions megatron bound at import time will not be counted",
                stacklevel=2,
            )
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        names = []
        for name, sizer in _SIZERS.items():
            orig = getattr(c10d, name, None) or getattr(dist, name, None)
            if orig is None:
                continue  # e.g. reduce_scatter_tensor_coalesced in torch 2.13
            orig = getattr(orig, _MARK, orig)
            wrapper = _make_wrapper(name, orig, sizer)
            for mod in (dist, c10d):
                if getattr(mod, name, None) is not None:
                    setattr(mod, name, wrapper)
            names.append(name)
        COUNTED_NAMES = tuple(names)
        return COUNTED_NAMES


def reset() -> None:
    """Zero all counters of this process."""
    _calls.clear()
    _bytes.clear()


def snapshot() -> dict[str, dict[str, int]]:
    """``{name: {"calls": int, "bytes": int}}`` for every counted name (zeros included)."""
    names = set(COUNTED_NAMES) | set(_calls) | set(_bytes)
    return {n: {"calls": _calls.get(n, 0), "bytes": _bytes.get(n, 0)} for n in sorted(names)}


class Counted:
    """Counts captured by ``counted()``; filled in when the ``with`` block exits.

    ``calls``/``bytes`` are ``collections.Counter`` objects holding only the non-zero
    entries (missing names read as 0; ``c.calls == {"all_reduce": 3}`` works).
    """

    def __init__(self) -> None:
        self.calls: collections.Counter = collections.Counter()
        self.bytes: collections.Counter = collections.Counter()

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def __repr__(self) -> str:
        return f"Counted(calls={dict(self.calls)}, bytes={dict(self.bytes)})"


@contextlib.contextmanager
def counted() -> Iterator[Counted]:
    """Count the collectives issued inside the block (delta of the global counters)."""
    if not COUNTED_NAMES:
        raise RuntimeError(
            "tests.harness.counting.install() has not run in this process "
            "(it runs automatically in WorkerPool workers)"
        )
    before_c, before_b = dict(_calls), dict(_bytes)
    out = Counted()
    try:
        yield out
    finally:
        for n, v in _calls.items():
            d = v - before_c.get(n, 0)
            if d:
                out.calls[n] = d
        for n, v in _bytes.items():
            d = v - before_b.get(n, 0)
            if d:
                out.bytes[n] = d


@contextlib.contextmanager
def received() -> Iterator[list[tuple[str, tuple[int, ...]]]]:
    """("all_reduce" | "all_gather", shape) of the tensor this rank receives from every
    `dist.all_reduce` / `dist.all_gather_into_tensor` called inside the block, in call order (for
    the "no full matrix on the wire" checks).  Patches the `torch.distributed` attributes only,
    so it sees the calls made through them; enter `counted()` inside it to count the same calls."""
    import torch.distributed as dist

    out: list[tuple[str, tuple[int, ...]]] = []
    all_reduce, all_gather = dist.all_reduce, dist.all_gather_into_tensor

    def recording_all_reduce(tensor, *args, **kwargs):
        out.append(("all_reduce", tuple(tensor.shape)))
        return all_reduce(tensor, *args, **kwargs)

    def recording_all_gather(output, tensor, *args, **kwargs):
        out.append(("all_gather", tuple(output.shape)))
        return all_gather(output, tensor, *args, **kwargs)

    dist.all_reduce, dist.all_gather_into_tensor = recording_all_reduce, recording_all_gather
    try:
        yield out
    finally:
        dist.all_reduce, dist.all_gather_into_tensor = all_reduce, all_gather


def numels(records: list[tuple[str, tuple[int, ...]]]) -> list[int]:
    """The element counts of `received()`'s records."""
    return [math.prod(shape) for _, shape in records]
