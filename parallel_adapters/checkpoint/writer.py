"""Writing one checkpoint directory: per-rank files, the merged index, the atomic publish.

No torch.distributed here: `sharded.save_sharded` runs these on each rank and moves the reports
between ranks; the offline tools (`consolidate.reshard`) and the tests that emulate several ranks
in one process call them directly, so every checkpoint goes through the same code.
"""
from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any, Collection, Mapping, Sequence

import torch

from parallel_adapters.checkpoint.base_model import BaseModel, write_base_files
from parallel_adapters.checkpoint.layout import (
    CONFIG_FILE, EXTRA_STATE_FILE, INDEX_FILE, LATEST_FILE, SHARDS_DIR, TRAIN_STATE_DIR,
    CheckpointError, build_index, expert_shard_file, replica_owners, shard_file, tensor_entry, tmp_dir_for
)
from parallel_adapters.checkpoint.files import (
    fsync_dirs, fsync_together, tensor_bytes, write_json, write_safetensors, write_text_atomic
)
from parallel_adapters.checkpoint.outputs import swap_into_place
from parallel_adapters.checkpoint.train_state import write_optimizer_state, write_rng_state
from parallel_adapters.distributed.sharding import ShardedTensor
from parallel_adapters.storage.paths import resolve_inside

# ----------------------------------------------------------------------------------------------
# Writers (also used directly by tests to build emulated multi-rank checkpoints)
# ----------------------------------------------------------------------------------------------

def shard_file_order(tensors: Mapping[str, ShardedTensor], tp_rank: int, tp_size: int
                     ) -> list[tuple[str, ShardedTensor]]:
    """What TP rank `tp_rank`'s shard file holds, by name: its part of every split tensor, and the
    replicated tensors `replica_owners` gives it (each replicated tensor is stored once)."""
    owners = replica_owners({n: t.local.numel() * t.local.element_size()
                             for n, t in tensors.items() if t.spec.replicated}, tp_size)
    return [(n, t) for n, t in sorted(tensors.items()) if owners.get(n, tp_rank) == tp_rank]


def tensor_digest(t: torch.Tensor) -> str:
    """CRC-32 of dtype, shape and bytes, for comparing TP replicas (not for file integrity, which
    is sha256).  It catches every difference confined to 32 consecutive bits, so any one changed
    element, and misses others with probability 2^-32; at ~4x sha256's speed it keeps the check
    cheap on ranks that do not write the tensor."""
    crc = zlib.crc32(f"{t.dtype}|{tuple(t.shape)}|".encode())
    return f"{zlib.crc32(tensor_bytes(t), crc):08x}"


def replica_digests(tensors: Mapping[str, ShardedTensor]) -> dict[str, str]:
    """name -> `tensor_digest` of every TP-replicated tensor this rank holds."""
    return {n: tensor_digest(t.local) for n, t in sorted(tensors.items()) if t.spec.replicated}


def write_rank_files(
    tmp_dir: Path, tensors: Mapping[str, ShardedTensor], *, tp_rank: int, tp_size: int, pp_rank: int,
    dp_rank: int, optimizer_state: Mapping[str, Any] | None = None,
    rng_state: Mapping[str, torch.Tensor] | None = None, with_replica_digests: bool = False,
    expert_names: Collection[str] = (), ep_rank: int = 0, expert_dp_rank: int = 0,
    etp_rank: int | None = None, etp_size: int | None = None,
) -> dict:
    """One rank's files; returns its report (index entries, file records) for world rank 0.

    Only DP rank 0 writes adapter tensors, each replicated one from a single TP rank; the
    routed-expert tensors named in `expert_names` (split over expert-TP: rank `etp_rank` of
    `etp_size`, by default the TP ones) are written by expert-DP rank 0 of each EP rank instead,
    into its own file, their index entries keyed by expert-TP rank (with the split size when it is
    not tp_size).  Every file's record comes from the bytes this rank wrote.  `with_replica_digests`:
    also report "replica_digests" / "expert_replica_digests" (see `replica_digests`) for the
    replica checks over TP / expert-TP.
    """
    etp_rank = tp_rank if etp_rank is None else etp_rank
    etp_size = tp_size if etp_size is None else etp_size
    with fsync_together():  # every file's fsync overlaps the hashing and writing that follow
        report: dict[str, Any] = {"tensors": {}, "files": {}, "optimizer": {}, "rng": {}}
        experts = set(expert_names)
        dense = {n: t for n, t in tensors.items() if n not in experts}
        routed = {n: t for n, t in tensors.items() if n in experts}
        parts = [(dp_rank == 0, dense, shard_file(tp_rank, pp_rank), tp_rank, None),
                 (expert_dp_rank == 0, routed, expert_shard_file(etp_rank, pp_rank, ep_rank), etp_rank, etp_size)]
        for writes, held, rel, rank, split in parts:
            order = shard_file_order(held, rank, split or tp_size) if writes else []
            if order:
                report["files"][rel] = write_safetensors(tmp_dir / rel, {n: t.local for n, t in order})
                report["tensors"].update({n: tensor_entry(t, n, rank, tp_size, pp_rank, rel, split)
                                          for n, t in order})
        if with_replica_digests:
            report["replica_digests"] = replica_digests(dense)
            report["expert_replica_digests"] = replica_digests(routed)
        if optimizer_state is not None:
            entry, files = write_optimizer_state(tmp_dir, tp_rank, pp_rank, dp_rank, optimizer_state)
            report["optimizer"], report["files"] = entry, {**report["files"], **files}
        if rng_state is not None:
            entry, files = write_rng_state(tmp_dir, tp_rank, pp_rank, dp_rank, rng_state)
            report["rng"], report["files"] = entry, {**report["files"], **files}
        return report


def write_global_files(tmp_dir: Path, config: Mapping[str, Any], extra_state: Mapping | None,
                       base: BaseModel | None = None) -> dict:
    """World rank 0's files (adapter_config.json, extra_state.json, the base's hf_config.json) as a report."""
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{tmp_dir / CONFIG_FILE}: config must be a dict, got {type(config).__name__}")
    files = {CONFIG_FILE: write_json(tmp_dir / CONFIG_FILE, dict(config)), **write_base_files(tmp_dir, base)}
    if extra_state is not None:
        if not isinstance(extra_state, Mapping):
            raise CheckpointError(f"{tmp_dir / EXTRA_STATE_FILE}: extra_state must be a dict")
        files[EXTRA_STATE_FILE] = write_json(tmp_dir / EXTRA_STATE_FILE, dict(extra_state))
    return {"files": files, "extra_state": EXTRA_STATE_FILE if extra_state is not None else None}


def _merge_tensor(tensors: dict, name: str, entry: dict) -> None:
    if name not in tensors:
        tensors[name] = {**entry, "files": dict(entry["files"])}
        return
    have = tensors[name]
    for field in ("global_shape", "dtype", "shard", "split_size"):
        if have.get(field) != entry.get(field):
            raise CheckpointError(f"tensor {name!r}: ranks disagree on {field}: {have.get(field)} vs {entry.get(field)}")
    clash = set(have["files"]) & set(entry["files"])
    if clash:
        raise CheckpointError(f"tensor {name!r}: shard {sorted(clash)} written twice")
    have["files"].update(entry["files"])


def assemble_index(reports: Sequence[dict], tp_size: int, pp_size: int, dp_size: int) -> dict:
    """Merge every rank's report into one validated index document."""
    tensors: dict[str, dict] = {}
    files: dict[str, dict] = {}
    state: dict[str, Any] = {"optimizer": {}, "rng": {}, "extra_state": None}
    for rep in reports:
        for rel, rec in rep.get("files", {}).items():
            if rel in files:
                raise CheckpointError(f"file {rel!r} reported by two ranks")
            files[rel] = rec
        for name, entry in rep.get("tensors", {}).items():
            _merge_tensor(tensors, name, entry)
        state["optimizer"].update(rep.get("optimizer", {}))
        state["rng"].update(rep.get("rng", {}))
        state["extra_state"] = rep.get("extra_state") or state["extra_state"]
    world = tp_size * pp_size * dp_size
    for kind in ("optimizer", "rng"):
        if state[kind] and len(state[kind]) != world:
            raise CheckpointError(f"{kind} state given on {len(state[kind])} of {world} ranks: all or none")
    return build_index(tp_size, pp_size, dp_size, tensors, files, state)


# ----------------------------------------------------------------------------------------------
# Publishing (world rank 0)
# ----------------------------------------------------------------------------------------------

def _verify_written(tmp_dir: Path, index: dict) -> None:
    """Every indexed file exists with the size its writer reported, and nothing else is in the
    directory.  No re-hash: each writer hashed the bytes it wrote, and loaders verify the sha256."""
    for rel, rec in index["files"].items():
        path = resolve_inside(tmp_dir, rel)
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            raise CheckpointError(f"{path}: reported as written but missing") from None
        if not path.is_file():
            raise CheckpointError(f"{path}: reported as written but not a regular file")
        if size != rec["bytes"]:
            raise CheckpointError(f"{path}: {size} bytes on disk, writer reported {rec['bytes']}")
    on_disk = {p.relative_to(tmp_dir).as_posix() for p in tmp_dir.rglob("*") if p.is_file()}
    stray = sorted(on_disk - set(index["files"]))
    if stray:
        raise CheckpointError(f"{tmp_dir}: unexpected files {stray}")


def publish(tmp_dir: Path, final: Path, index: dict, update_latest: bool = True) -> None:
    """Verify, write index.json LAST, rename into place, then (optionally) point `latest` at it."""
    _verify_written(tmp_dir, index)
    with fsync_together():  # index.json and the directory entries, flushed together before the rename
        write_json(tmp_dir / INDEX_FILE, index, compact=True)
        fsync_dirs(sub for sub in (tmp_dir / SHARDS_DIR, tmp_dir / TRAIN_STATE_DIR, tmp_dir) if sub.is_dir())
    swap_into_place(tmp_dir, final)
    if update_latest:
        write_text_atomic(final.parent / LATEST_FILE, final.name + "\n")


def make_tmp_dir(final: Path) -> Path:
    """The hidden sibling (with shards/ and train_state/) that a save or reshard writes into."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir_for(final)
    tmp.mkdir()
    (tmp / SHARDS_DIR).mkdir()
    (tmp / TRAIN_STATE_DIR).mkdir()
    return tmp
