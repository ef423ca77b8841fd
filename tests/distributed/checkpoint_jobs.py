"""Checkpoint test data, an emulated multi-rank writer, and the jobs run on real gloo ranks.

Shared by tests/unit/checkpoint (one process) and tests/distributed/test_checkpoint_sharded.py
(`pool2.run(job, ...)` runs a job on every rank).  Also a `python -m` entry point that saves a
large-ish checkpoint slowly, for the SIGKILL-midway test.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from parallel_adapters.checkpoint.writer import (
    assemble_index, make_tmp_dir, publish, write_global_files, write_rank_files,
)
from parallel_adapters.distributed.groups import ParallelGroups
from parallel_adapters.distributed.sharding import ShardedTensor, ShardSpec

L0 = "decoder.layers.0"
L1 = "decoder.layers.1"
CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["linear_qkv", "linear_fc1"]}
# name -> (global shape, spec, dtype); every split dim divides by chunks x 4 TP ranks.
LAYOUT: dict[str, tuple[tuple[int, ...], ShardSpec, torch.dtype]] = {
    f"{L0}.self_attention.linear_qkv.lora_A.default.weight": ((4, 8), ShardSpec(), torch.float64),
    f"{L0}.self_attention.linear_qkv.lora_B.default.weight": ((24, 4), ShardSpec(dim=0), torch.float64),
    f"{L0}.self_attention.linear_proj.lora_A.default.weight": ((4, 8), ShardSpec(dim=1), torch.float64),
    f"{L0}.self_attention.linear_proj.lora_B.default.weight": ((8, 4), ShardSpec(), torch.float64),
    f"{L1}.mlp.linear_fc1.lora_B.default.weight": ((32, 4), ShardSpec(dim=0, chunks=2), torch.float64),
    f"{L1}.mlp.linear_fc2.lora_A.default.weight": ((4, 16), ShardSpec(dim=1), torch.float32),
}
REPLICATED_NAME = f"{L0}.self_attention.linear_qkv.lora_A.default.weight"
SPLIT_NAME = f"{L0}.self_attention.linear_qkv.lora_B.default.weight"
MISSING_NAME = "decoder.layers.9.mlp.linear_fc2.lora_B.default.weight"


def full_tensors(seed: int = 0, scale: int = 1) -> dict[str, torch.Tensor]:
    """Deterministic full tensors (the same on every rank); `scale` enlarges dim 0 of B factors."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (shape, _, dtype) in LAYOUT.items():
        shape = (shape[0] * scale, *shape[1:]) if "lora_B" in name else shape
        out[name] = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return out


def expected(full: dict[str, torch.Tensor] | None = None, names=None) -> dict:
    full = full if full is not None else full_tensors()
    names = names if names is not None else list(LAYOUT)
    return {n: (LAYOUT[n][1], tuple(full[n].shape), full[n].dtype) for n in names}


def stage_of(name: str, pp_size: int) -> int:
    """Layer 0 on stage 0, layer 1 on the last stage (names carry the global layer index)."""
    return 0 if pp_size == 1 or name.startswith(L0 + ".") else pp_size - 1


def sharded(full: dict[str, torch.Tensor], tp_rank: int, tp_size: int, pp_rank: int = 0,
            pp_size: int = 1) -> dict[str, ShardedTensor]:
    """What the model side hands over on one (tp, pp) rank."""
    return {n: ShardedTensor(LAYOUT[n][1].shard(t, tp_rank, tp_size).clone(), LAYOUT[n][1], tuple(t.shape))
            for n, t in full.items() if stage_of(n, pp_size) == pp_rank}


def corrupt_last_byte(path: Path) -> None:
    """Flip the last byte of a file in place (a checksum must catch it)."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def write_emulated_checkpoint(directory: Path, full: dict[str, torch.Tensor], tp_size: int,
                              pp_size: int = 1, dp_size: int = 1, optimizer: bool = False,
                              extra_state: dict | None = None) -> Path:
    """A checkpoint as save_sharded would write it at (tp, pp, dp), built in one process with the
    same writer functions (save itself is collective and cannot be called per fake rank)."""
    final = Path(directory).absolute()
    tmp = make_tmp_dir(final)
    reports = []
    for pp in range(pp_size):
        for dp in range(dp_size):
            for tp in range(tp_size):
                optim = {"exp_avg": torch.full((2,), float(tp + 10 * pp + 100 * dp)), "step": 7} if optimizer else None
                reports.append(write_rank_files(tmp, sharded(full, tp, tp_size, pp, pp_size), tp_rank=tp,
                                                tp_size=tp_size, pp_rank=pp, dp_rank=dp, optimizer_state=optim))
    reports.append(write_global_files(tmp, CONFIG, extra_state))
    publish(tmp, final, assemble_index(reports, tp_size, pp_size, dp_size))
    return final


# ----------------------------------------------------------------------------------------------
# Jobs for real ranks (pool2 / pool4)
# ----------------------------------------------------------------------------------------------

def make_groups(tp_size: int) -> ParallelGroups:
    """TP groups of consecutive ranks, DP groups strided; every rank creates every group in order."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    dp_size = world // tp_size
    tp_group = dp_group = None
    for d in range(dp_size):
        ranks = list(range(d * tp_size, (d + 1) * tp_size))
        g = dist.new_group(ranks)
        tp_group = g if rank in ranks else tp_group
    for t in range(tp_size):
        ranks = list(range(t, world, tp_size))
        g = dist.new_group(ranks)
        dp_group = g if rank in ranks else dp_group
    return ParallelGroups(tp_group=tp_group, dp_group=dp_group, tp_size=tp_size, tp_rank=rank % tp_size,
                          dp_size=dp_size, dp_rank=rank // tp_size)


def _catch(fn, *args, **kwargs) -> str | None:
    """The CheckpointError message fn raised, or None; any other exception propagates."""
    from parallel_adapters.checkpoint.layout import CheckpointError

    try:
        fn(*args, **kwargs)
    except CheckpointError as exc:
        return str(exc)
    return None


def job_save_load(directory: str, tp_size: int) -> dict:
    """Save (with per-rank optimizer + RNG state, extra_state), then load everything back."""
    import random

    from parallel_adapters.checkpoint.sharded import (
        load_sharded, load_train_state, restore_rng_state, save_sharded,
    )

    groups = make_groups(tp_size)
    rank = torch.distributed.get_rank()
    full = full_tensors()
    optim = {"decoder.layers.0.x.exp_avg": torch.arange(3, dtype=torch.float64) + rank, "step": 5 + rank}
    torch.manual_seed(100 + rank)
    random.seed(200 + rank)
    path = save_sharded(directory, sharded(full, groups.tp_rank, tp_size), groups, CONFIG,
                        optimizer_state=optim, extra_state={"step": 5, "rank0": True})
    draws = (torch.rand(3), random.random())  # what a resumed run must reproduce
    local = load_sharded(path, groups, expected(full))
    want = sharded(full, groups.tp_rank, tp_size)
    opt, rng, extra = load_train_state(path, groups)
    torch.manual_seed(0)
    random.seed(0)
    restore_rng_state(rng)
    return {
        "rank": rank, "path": str(path),
        "bitwise": {n: torch.equal(local[n], want[n].local) and local[n].dtype == want[n].local.dtype for n in want},
        "optim_ok": torch.equal(opt["decoder.layers.0.x.exp_avg"], optim["decoder.layers.0.x.exp_avg"])
        and opt["step"] == 5 + rank,
        "rng_ok": torch.equal(torch.rand(3), draws[0]) and random.random() == draws[1],
        "extra": extra,
    }


def job_replica_mismatch(directory: str) -> str | None:
    """TP rank 1 holds a different copy of a replicated factor: every rank must raise."""
    from parallel_adapters.checkpoint.sharded import save_sharded

    groups = make_groups(2)
    mine = sharded(full_tensors(), groups.tp_rank, 2)
    if groups.tp_rank == 1:
        bad = mine[REPLICATED_NAME].local.clone()
        bad[0, 0] += 1e-12
        mine[REPLICATED_NAME] = ShardedTensor(bad, ShardSpec(), mine[REPLICATED_NAME].global_shape)
    return _catch(save_sharded, directory, mine, groups, CONFIG)


def job_local_check_failure(directory: str) -> str | None:
    """Only rank 1 hands over an inconsistent tensor: rank 0 must raise too instead of waiting."""
    from parallel_adapters.checkpoint.sharded import save_sharded

    groups = make_groups(2)
    mine = sharded(full_tensors(), groups.tp_rank, 2)
    if groups.tp_rank == 1:
        mine[SPLIT_NAME] = ShardedTensor(torch.zeros(5, 4, dtype=torch.float64), ShardSpec(dim=0), (24, 4))
    return _catch(save_sharded, directory, mine, groups, CONFIG)


def job_write_failure(directory: str, previous: str) -> dict:
    """Rank 1's optimizer state cannot be written: all ranks raise; `previous` stays published."""
    from parallel_adapters.checkpoint.sharded import save_sharded

    groups = make_groups(2)
    mine = sharded(full_tensors(), groups.tp_rank, 2)
    save_sharded(previous, mine, groups, CONFIG)
    optim = {"ok": torch.zeros(1)} if groups.tp_rank == 0 else {"bad": object()}
    return {"error": _catch(save_sharded, directory, mine, groups, CONFIG, optimizer_state=optim)}


def job_load_mismatch(directory: str) -> str | None:
    """Only rank 0's model has a tensor the checkpoint lacks: both ranks must raise together."""
    from parallel_adapters.checkpoint.sharded import load_sharded

    groups = make_groups(2)
    want = expected()
    if groups.tp_rank == 0:
        want[MISSING_NAME] = (ShardSpec(), (2, 2), torch.float64)
    return _catch(load_sharded, directory, groups, want)


def _slow_save_main(directory: str, scale: str) -> None:
    """`python -m tests.distributed.checkpoint_jobs DIR SCALE`: one-process save of a large-ish
    checkpoint; the test sets PA_CHECKPOINT_TEST_DELAY_S so it stalls before publishing."""
    from parallel_adapters.checkpoint.sharded import save_sharded

    full = full_tensors(seed=1, scale=int(scale))
    print("saving", flush=True)
    save_sharded(directory, sharded(full, 0, 1), ParallelGroups.single(), CONFIG)
    print("saved", flush=True)


if __name__ == "__main__":
    _slow_save_main(*sys.argv[1:])
