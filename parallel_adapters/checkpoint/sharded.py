"""Sharded save/load on every rank, with an atomic publish and exact resume.

Save protocol (every rank calls `save_sharded`; collectives only via distributed/collectives.py):

 1. local checks; all ranks agree they passed (else all raise, naming rank and tensor);
 2. world rank 0 creates the hidden sibling `<parent>/.<name>.tmp-<token>`, everyone learns it;
 3. every rank writes its files into it (DP rank 0 of each (tp, pp): the shard file; every rank:
    optimizer and RNG state; world rank 0: adapter_config.json and extra_state.json), hashing
    each file from the bytes it writes (no read-back), ranks in parallel.  Each TP-replicated
    tensor is written by one TP rank (`layout.replica_owners` spreads them by size), and every
    rank reports a CRC-32 per replicated tensor it holds (`writer.tensor_digest`);
 4. all ranks agree the writes succeeded (else all raise, naming rank and file), then gather the
    reports; replicated tensors must be bit-identical over TP: every rank compares the gathered
    digests of each TP group the same way, so if any differ all raise, naming the tensors;
 5. world rank 0 checks every reported file exists with the reported size (the loader verifies
    the sha256), writes index.json LAST, renames the directory into place and only then rewrites
    `<parent>/latest`.

A crash anywhere before step 5's rename leaves the previous checkpoint and `latest` untouched; the
temporary directory has no index.json, so no loader ever takes it for a checkpoint.
"""
from __future__ import annotations

import os
import shutil
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Mapping, Sequence, TypeVar

import torch
from tqdm import tqdm

from parallel_adapters.checkpoint.base_model import BaseModel
from parallel_adapters.checkpoint.layout import CheckpointError, rank_key
from parallel_adapters.checkpoint.locate import resolve_latest  # noqa: F401  (re-exported public API)
from parallel_adapters.checkpoint.files import fsync_together
from parallel_adapters.checkpoint.finite import nonfinite_count
from parallel_adapters.checkpoint.reader import CheckpointReader
from parallel_adapters.checkpoint.train_state import (  # noqa: F401  (re-exported public API)
    capture_rng_state, load_train_state, restore_rng_state,
)
from parallel_adapters.checkpoint.writer import (  # noqa: F401  (tensor_digest: re-exported)
    assemble_index, make_tmp_dir, publish, replica_digests, tensor_digest, write_global_files, write_rank_files,
)
from parallel_adapters.distributed.agreement import raise_listed, raise_together
from parallel_adapters.distributed.collectives import all_gather_objects, group_rank, group_size
from parallel_adapters.distributed.groups import ParallelGroups
from parallel_adapters.distributed.sharding import ShardedTensor, ShardSpec
from parallel_adapters.storage.paths import check_plain_name
from parallel_adapters.storage.safetensors_format import dtype_name

__all__ = ["save_sharded", "load_sharded", "load_train_state", "resolve_latest", "capture_rng_state",
           "restore_rng_state", "check_tp_replicas", "tensor_digest", "TEST_DELAY_ENV"]

T = TypeVar("T")
Expected = Mapping[str, tuple[ShardSpec, Sequence[int], torch.dtype]]
TEST_DELAY_ENV = "PA_CHECKPOINT_TEST_DELAY_S"
_PROGRESS_MIN_ITEMS = 64


# ----------------------------------------------------------------------------------------------
# Agreement helpers: a failure on one rank becomes an error on every rank, never a hang
# ----------------------------------------------------------------------------------------------

def _guard(who: str, fn: Callable[[], T]) -> tuple[T | None, str | None]:
    """Run a local step; return (result, None) or (None, message naming this rank)."""
    try:
        return fn(), None
    except Exception as exc:  # noqa: BLE001 - every local failure must reach the agreement step
        detail = str(exc) if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, (CheckpointError, OSError)):
            detail += "\n" + traceback.format_exc(limit=3)
        return None, f"{who}: {detail}"


def _progress(items: Iterable[T], total: int, desc: str) -> Iterable[T]:
    """tqdm only on world rank 0 and only for long loops."""
    enabled = group_rank(None) == 0 and total >= _PROGRESS_MIN_ITEMS
    return tqdm(items, total=total, desc=desc, disable=not enabled, leave=False)


def _test_hook_delay() -> None:
    """TEST HOOK ONLY: sleep $PA_CHECKPOINT_TEST_DELAY_S after this rank's writes, before publishing,
    so that a test can SIGKILL a save midway.  Unset (the default) means no delay."""
    delay = os.environ.get(TEST_DELAY_ENV)
    if delay:
        time.sleep(float(delay))


# ----------------------------------------------------------------------------------------------
# Checks before anything is written
# ----------------------------------------------------------------------------------------------

def _split_size(name: str, groups: ParallelGroups, expert_names: Collection[str]) -> int:
    """Ranks splitting tensor `name`: expert-TP for a routed expert's, TP otherwise."""
    return groups.etp_size if name in expert_names else groups.tp_size


def _check_inputs(tensors: Mapping[str, ShardedTensor], groups: ParallelGroups,
                  expert_names: Collection[str] = ()) -> None:
    world = group_size(None)
    if groups.tp_size * groups.pp_size * groups.dp_size != world:
        raise CheckpointError(
            f"tp {groups.tp_size} x pp {groups.pp_size} x dp {groups.dp_size} != world size {world}")
    for name, t in tensors.items():
        if not isinstance(name, str) or not name or not isinstance(t, ShardedTensor):
            raise CheckpointError(f"tensor {name!r}: expected a non-empty name -> ShardedTensor")
        dtype_name(t.local.dtype)
        split = _split_size(name, groups, expert_names)
        try:
            want = t.spec.local_shape(t.global_shape, split)
        except ValueError as exc:
            raise CheckpointError(f"tensor {name!r}: {exc}") from None
        if tuple(t.local.shape) != want:
            raise CheckpointError(
                f"tensor {name!r}: local shape {tuple(t.local.shape)} does not match global shape "
                f"{tuple(t.global_shape)} split by {t.spec} over {split} ranks (expected {want})")
        if nonfinite_count(t.local):
            raise CheckpointError(f"tensor {name!r} holds {nonfinite_count(t.local)} non-finite value(s) (NaN or inf): "
                                  "refusing to save it (the previous checkpoints are kept)")


def _compare_replicas(gathered: list[tuple[int, dict | None]]) -> str | None:
    """Message describing how one TP group's replicated tensors disagree, or None.
    `gathered`: (global rank, name -> digest or None if that rank failed) in TP rank order."""
    rank0, ref = gathered[0]
    problems = []
    for tp, (rank, digests) in enumerate(gathered[1:], start=1):
        if digests is None or ref is None:
            continue  # that rank's own error is reported by the agreement step
        if set(digests) != set(ref):
            problems.append(f"replicated tensor names differ: tp rank 0 (global rank {rank0}) has "
                            f"{sorted(set(ref) - set(digests))} only, tp rank {tp} (global rank {rank}) "
                            f"has {sorted(set(digests) - set(ref))} only")
        for name in sorted(set(ref) & set(digests)):
            if ref[name] != digests[name]:
                problems.append(f"replicated tensor {name!r} differs across TP ranks: tp rank 0 "
                                f"(global rank {rank0}) != tp rank {tp} (global rank {rank})")
    return "; ".join(problems) or None


def check_tp_replicas(tensors: Mapping[str, ShardedTensor] | None, groups: ParallelGroups, who: str) -> str | None:
    """Collective over the TP group: error message if a replicated tensor differs between TP ranks.

    A replicated factor that differs is a bug that would export a state no rank's adapter
    represents (docs/design.md section 6); every rank gets the same answer, so all raise together.
    `tensors=None` (this rank already failed) still joins the collective but compares nothing.
    (`save_sharded` does the same comparison on the digests it gathers with the write reports.)
    """
    digests, err = None, None
    if tensors is not None:
        digests, err = _guard(who, lambda: replica_digests(tensors))
    gathered = all_gather_objects((group_rank(None), digests), groups.tp_group)
    return err or _compare_replicas(gathered)


def _replica_problems(gathered: Sequence[tuple[tuple[int, ...], int, dict | None]]) -> str | None:
    """The replica check over every splitting group, from (place, global rank, digests) of all
    ranks, where place is (the group's coordinates..., the rank in it): ("tp", pp, dp, tp) for TP
    groups, ("etp", pp, ep, expert-dp, etp) for expert-TP groups.  The same message (or None) on every
    rank that computes it."""
    groups: dict[tuple[int, ...], list] = {}
    for place, rank, digests in sorted(gathered, key=lambda g: g[0]):
        groups.setdefault(place[:-1], []).append((rank, digests))
    problems = [p for members in groups.values() if (p := _compare_replicas(members))]
    return "; ".join(problems) or None


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------

def save_sharded(
    directory: str | Path, tensors: Mapping[str, ShardedTensor], groups: ParallelGroups,
    config: Mapping[str, Any], optimizer_state: Mapping[str, Any] | None = None,
    extra_state: Mapping[str, Any] | None = None, rng_state: bool = True,
    rng_extra: Mapping[str, torch.Tensor] | None = None, base: BaseModel | None = None,
    expert_names: Collection[str] = (),
) -> Path:
    """Collective save of this rank's adapter shards (+ train state); returns the final directory.

    Must be called on EVERY rank with the same `directory`. Raises CheckpointError on all ranks
    together if any rank fails; the previous checkpoint and `<parent>/latest` stay untouched then.
    `rng_extra`: more per-rank RNG states (uint8 tensors) saved with torch's, e.g. the adapters'
    dropout streams; `load_train_state` returns them in the same dict.  `base`: the base model
    to record (checkpoint/base_model.py; its path belongs in `config` as base_model_name_or_path).
    `expert_names`: the routed MoE experts' tensors, held per EP rank and written by expert-DP
    rank 0 of each, split over expert-TP (the index records that split size when it is not TP's).
    """
    final = Path(directory).absolute()
    rank = group_rank(None)
    who = f"rank {rank} ({rank_key(groups.tp_rank, groups.pp_rank, groups.dp_rank)})"

    def prepare() -> str | None:
        check_plain_name(final.name, "checkpoint directory")
        _check_inputs(tensors, groups, expert_names)
        return str(make_tmp_dir(final)) if rank == 0 else None

    tmp_str, err = _guard(who, prepare)
    prepared = all_gather_objects((tmp_str, err), None)  # one collective: the checks and the temp name
    if tmp_str is not None and any(e for _, e in prepared):
        shutil.rmtree(tmp_str, ignore_errors=True)
    raise_listed([e for _, e in prepared], f"save of {final}", error_type=CheckpointError)
    tmp = Path(prepared[0][0])
    cleanup = (lambda: shutil.rmtree(tmp, ignore_errors=True)) if rank == 0 else None
    check_replicas = groups.tp_size > 1 or (bool(expert_names) and groups.etp_size > 1)

    def write_local() -> dict:
        with fsync_together():  # this rank's files are flushed concurrently, all done on return
            return _write_local()

    def _write_local() -> dict:
        rep = write_rank_files(tmp, tensors, tp_rank=groups.tp_rank, tp_size=groups.tp_size,
                               pp_rank=groups.pp_rank, dp_rank=groups.dp_rank,
                               optimizer_state=optimizer_state,
                               rng_state={**capture_rng_state(), **(rng_extra or {})} if rng_state else None,
                               with_replica_digests=check_replicas, expert_names=expert_names,
                               ep_rank=groups.ep_rank, expert_dp_rank=groups.expert_dp_rank,
                               etp_rank=groups.etp_rank, etp_size=groups.etp_size)
        if rank == 0:
            glob = write_global_files(tmp, config, extra_state, base)
            rep["files"].update(glob["files"])
            rep["extra_state"] = glob["extra_state"]
        return rep

    report, err = _guard(who, write_local)
    _test_hook_delay()
    place = ("tp", groups.pp_rank, groups.dp_rank, groups.tp_rank)
    expert_place = ("etp", groups.pp_rank, groups.ep_rank, groups.expert_dp_rank, groups.etp_rank)
    digests = report.pop("replica_digests", None) if report is not None else None
    expert_digests = report.pop("expert_replica_digests", None) if report is not None else None
    # One collective: every rank's error, replica digests and report; all ranks decide alike.
    gathered = all_gather_objects((err, place, rank, digests, report, expert_place, expert_digests), None)
    errors = [g[0] for g in gathered]
    if not any(errors) and check_replicas:
        errors = [_replica_problems([g[1:4] for g in gathered] + [(g[5], g[2], g[6]) for g in gathered])]
    if any(errors) and cleanup is not None:
        cleanup()
    raise_listed(errors, f"save of {final}", error_type=CheckpointError)
    reports = [g[4] for g in gathered]

    err = None
    if rank == 0:
        _, err = _guard(who, lambda: publish(
            tmp, final, assemble_index(reports, groups.tp_size, groups.pp_size, groups.dp_size)))
        if err:
            cleanup()
    err = all_gather_objects(err, None)[0]
    if err:
        raise CheckpointError(f"save of {final} failed while publishing: {err}")
    return final


def _check_expected(reader: CheckpointReader, expected: Expected, all_names: set[str] | None,
                    groups: ParallelGroups, expert_names: Collection[str]) -> list[str]:
    """Every mismatch between the checkpoint and the model, found before any tensor is read."""
    problems = [f"missing tensor {n!r}" for n in sorted(set(expected) - set(reader.tensors))]
    if all_names is not None:
        problems += [f"unexpected tensor {n!r} (no rank expects it)" for n in sorted(set(reader.tensors) - all_names)]
    for name in sorted(set(expected) & set(reader.tensors)):
        spec, shape, dtype = expected[name]
        info = reader.tensors[name]
        if tuple(shape) != info.global_shape:
            problems.append(f"tensor {name!r}: global shape {info.global_shape} in checkpoint, model has {tuple(shape)}")
        if dtype != info.dtype:
            problems.append(f"tensor {name!r}: dtype {dtype_name(info.dtype)} in checkpoint, model has {dtype_name(dtype)}")
        split = _split_size(name, groups, expert_names)
        try:
            spec.local_shape(tuple(shape), split)
        except ValueError as exc:
            problems.append(f"tensor {name!r}: cannot shard over {split} ranks: {exc}")
    return problems


def _load_local(directory: Path, groups: ParallelGroups, expected: Expected,
                all_names: set[str] | None, expert_names: Collection[str]) -> dict[str, torch.Tensor]:
    with CheckpointReader(directory) as reader:
        problems = _check_expected(reader, expected, all_names, groups, expert_names)
        if problems:
            shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
            raise CheckpointError(f"{directory} does not match the model:\n    " + "\n    ".join(shown))
        out = {}
        with reader.deferred_verification():  # files hashed while read; returned only once verified
            for name in _progress(sorted(expected), len(expected), "load checkpoint"):
                spec = expected[name][0]
                if name in expert_names:  # split over expert-TP here, whatever split it was saved with
                    out[name] = reader.read_local(name, spec, groups.etp_rank, groups.etp_size)
                else:
                    out[name] = reader.read_local(name, spec, groups.tp_rank, groups.tp_size)
                if nonfinite_count(out[name]):  # training on it would only produce NaN losses
                    raise CheckpointError(f"{directory}: tensor {name!r} holds {nonfinite_count(out[name])} non-finite "
                                          "value(s) (NaN or inf); resume from an earlier checkpoint")
        return out


def load_sharded(directory: str | Path, groups: ParallelGroups, expected: Expected,
                 collective: bool = True, expert_names: Collection[str] = ()) -> dict[str, torch.Tensor]:
    """This rank's LOCAL tensors at the CURRENT TP size (routed experts' in `expert_names`: at the
    current expert-TP size), resharding if the checkpoint's differs.

    `expected` maps every tensor this rank holds to (ShardSpec, global shape, dtype).  With
    `collective=True` (all ranks call it) the ranks' expected names are pooled to find tensors no
    rank expects, and a failure on any rank raises on all.  Use `collective=False` when only some
    processes load (offline tools, emulated ranks); then extra tensors are detected only if pp_size 1.
    """
    directory = Path(directory)
    world = group_size(None) if collective else 1
    if world > 1:
        all_names: set[str] | None = set().union(*all_gather_objects(sorted(expected), None))
    else:
        all_names = set(expected) if groups.pp_size == 1 else None
    who = f"rank {group_rank(None)} ({rank_key(groups.tp_rank, groups.pp_rank, groups.dp_rank)})"
    result, err = _guard(who, lambda: _load_local(directory, groups, expected, all_names, set(expert_names)))
    if world > 1:
        raise_together(err, f"load of {directory}", error_type=CheckpointError)
    elif err:
        raise CheckpointError(err)
    return result
