"""Multi-rank test harness: ``pool.WorkerPool`` (gloo/CPU worker processes) and
``counting`` (collective call/byte counters).  See ``tests/harness/pool.py``."""
