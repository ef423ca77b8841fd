"""The default process group of a run: joined under torchrun, created as a single process without it."""
from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist


def init_distributed(timeout_s: float) -> bool:
    """Join (or create) the default process group; True if this call created it.  Without torchrun
    variables a single-process group is made, so `run_training` also runs as a plain script."""
    if dist.is_initialized():
        return False
    if "MASTER_PORT" not in os.environ and os.environ.get("WORLD_SIZE", "1") == "1":
        os.environ["MASTER_PORT"] = str(_free_port())  # two single-process runs must not collide
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = timedelta(seconds=timeout_s)
    dist.init_process_group(backend, timeout=timeout, **_elastic_attempt_store(timeout))
    return True


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _elastic_attempt_store(timeout: timedelta) -> dict:
    """Under torchrun the workers share the agent's store across restarts, and torch keys process
    groups by name only: after `--max-restarts` the new attempt's groups would meet the killed
    attempt's keys and wait forever.  One key prefix per attempt keeps them apart."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return {"store": dist.PrefixStore(f"parallel_adapters/attempt_{attempt}", store),
            "rank": int(os.environ["RANK"]), "world_size": int(os.environ["WORLD_SIZE"])}
