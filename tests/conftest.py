"""Shared pytest fixtures.

``pool2`` / ``pool3`` / ``pool4``: session-wide ``tests.harness.pool.WorkerPool`` of 2 / 3 / 4 gloo CPU
ranks, started on first use (a 4-rank pool that imports megatron costs ~12 s on 2 cores,
so pools live for the whole session) and shut down at session end.  See
``tests/harness/pool.py`` for how to write a multi-rank test.
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
# Workers fork from a server that has imported these (after the collective counters), so each
# job skips the 2-5 s megatron import.
os.environ.setdefault("PA_HARNESS_PRELOAD", "megatron.core.parallel_state,megatron.core.tensor_parallel")

import pytest  # noqa: E402

from tests.harness.pool import WorkerPool, get_shared_pool, shutdown_shared_pools  # noqa: E402


@pytest.fixture(scope="session")
def pool2() -> WorkerPool:
    """2 ranks (gloo, CPU), shared by the whole session."""
    return get_shared_pool(2)


@pytest.fixture(scope="session")
def pool3() -> WorkerPool:
    """3 ranks (gloo, CPU): TP=3, for head counts that TP=2 cannot split."""
    return get_shared_pool(3)


@pytest.fixture(scope="session")
def pool4() -> WorkerPool:
    """4 ranks (gloo, CPU), shared by the whole session."""
    return get_shared_pool(4)


def pytest_sessionfinish(session, exitstatus):
    shutdown_shared_pools()
