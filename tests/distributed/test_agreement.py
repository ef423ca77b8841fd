"""agreement.py on real gloo ranks (world 2): when one rank fails, every rank raises the same
error naming it, and no rank is left waiting in a collective."""
from __future__ import annotations

import torch.distributed as dist

from parallel_adapters.distributed.agreement import agreed, on_rank0

TIMEOUT = 60


def _fail_on(rank: int) -> int:
    if dist.get_rank() == rank:
        raise OSError(f"disk of rank {rank} is full")
    return dist.get_rank()


def job_agreed(failing_rank: int | None) -> tuple[int | None, str | None]:
    """(result, None) or (None, the error this rank raised)."""
    try:
        return agreed(lambda: _fail_on(failing_rank), "saving"), None
    except RuntimeError as exc:
        return None, str(exc)


def job_on_rank0(fail: bool) -> tuple[object, str | None]:
    def work() -> dict:
        assert dist.get_rank() == 0, "on_rank0 ran fn on another rank"
        if fail:
            raise ValueError("no such directory")
        return {"written": "out/adapter_model.safetensors"}

    try:
        return on_rank0(work, "export"), None
    except ValueError as exc:  # the user's error: one line, the same on every rank
        return None, str(exc)


def test_agreed_passes_results_or_raises_on_every_rank(pool2):
    assert pool2.run(job_agreed, None, timeout=TIMEOUT) == [(0, None), (1, None)]
    results = pool2.run(job_agreed, 1, timeout=TIMEOUT)
    assert results == [(None, "saving failed:\n  rank 1: OSError: disk of rank 1 is full")] * 2


def test_on_rank0_result_and_error_reach_every_rank(pool2):
    assert pool2.run(job_on_rank0, False, timeout=TIMEOUT) == [({"written": "out/adapter_model.safetensors"}, None)] * 2
    results = pool2.run(job_on_rank0, True, timeout=TIMEOUT)
    assert results == [(None, "export failed on rank 0: no such directory")] * 2
