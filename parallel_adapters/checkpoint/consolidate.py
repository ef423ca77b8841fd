"""Offline tools (single process, no torch.distributed): shards -> full tensors; reshard to any TP
(and the routed experts' adapters to any expert-TP size, `mlp.experts.local_experts.` in the name).

Streaming: tensors are processed one at a time, and `reshard` writes its output files with a
header computed up front from the index, appending each tensor's bytes as it goes, so memory stays
at one tensor's shards however large the checkpoint is.  Checksums: every input file is verified
(on worker threads, while it is read, before anything is returned or published), and every output
file's record is hashed from the bytes written, never read back.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterator, Sequence

import torch
from tqdm import tqdm

from parallel_adapters.checkpoint.base_model import copy_base_files
from parallel_adapters.checkpoint.layout import (
    CONFIG_FILE, CheckpointError, TensorInfo, build_index, expert_shard_file, replica_owners, shard_file, shard_key
)
from parallel_adapters.checkpoint.files import SafetensorsWriter, write_json
from parallel_adapters.checkpoint.outputs import (
    check_output_dir, checkpoint_inputs, make_parents, mark_output, remove_created,
)
from parallel_adapters.checkpoint.reader import CheckpointReader
from parallel_adapters.checkpoint.writer import make_tmp_dir, publish
from parallel_adapters.hf.mapping import EXPERT_PREFIX
from parallel_adapters.storage.safetensors_format import dtype_name

def _tensor_files(reader: CheckpointReader) -> list[str]:
    return sorted({rel for info in reader.tensors.values() for rel in info.files.values()})


def iter_full_tensors(directory: str | Path, progress: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(Megatron name, full tensor) pairs, one at a time, in name order.  Each tensor is yielded
    only after the files it comes from are verified (all files are hashed in parallel up front)."""
    with CheckpointReader(directory) as reader:
        reader.verify_in_background(_tensor_files(reader))
        names = sorted(reader.tensors)
        for name in tqdm(names, desc="consolidate", disable=not progress, leave=False):
            yield name, reader.read_full(name)


def consolidate_from(reader: CheckpointReader, progress: bool = False) -> dict[str, torch.Tensor]:
    """`consolidate` with an open reader (reads while the files are hashed; returns once verified)."""
    names = sorted(reader.tensors)
    with reader.deferred_verification():
        out = {name: reader.read_full(name)
               for name in tqdm(names, desc="consolidate", disable=not progress, leave=False)}
    return out


def consolidate(directory: str | Path, progress: bool = False) -> dict[str, torch.Tensor]:
    """Every adapter tensor, unsharded, keyed by its Megatron module path."""
    with CheckpointReader(directory) as reader:
        return consolidate_from(reader, progress)


def _is_expert(info: TensorInfo) -> bool:
    return EXPERT_PREFIX in info.name


def _file(info: TensorInfo, rank: int) -> str:
    """Output file of split rank `rank`'s piece: the routed experts' in their own file (as a save
    at EP 1 writes them)."""
    return expert_shard_file(rank, info.pp_rank, 0) if _is_expert(info) else shard_file(rank, info.pp_rank)


def _holders(infos: Sequence[TensorInfo], sizes: dict[str, int]) -> dict[str, list[int]]:
    """name -> the output split ranks whose files hold it: all of them for a split tensor, one
    (`replica_owners` within the dense / expert tensors, as a save would pick) for a replicated one."""
    out = {}
    for expert in (False, True):
        part = [i for i in infos if _is_expert(i) == expert]
        size = max([sizes[i.name] for i in part], default=1)
        owners = replica_owners({i.name: i.nbytes for i in part if i.spec.replicated}, size)
        out.update({i.name: [owners[i.name]] if i.spec.replicated else list(range(size)) for i in part})
    return out


def _plan(infos: Sequence[TensorInfo], holders: dict[str, list[int]], sizes: dict[str, int]) -> dict[str, list]:
    """Output file -> [(name, dtype, local shape)] in name order."""
    plan: dict[str, list] = {}
    for info in infos:
        for r in holders[info.name]:
            plan.setdefault(_file(info, r), []).append((info.name, info.dtype, info.local_shape(sizes[info.name])))
    return plan


def _index_entry(info: TensorInfo, ranks: list[int], split: int, tp_size: int) -> dict:
    entry = {"global_shape": list(info.global_shape), "dtype": dtype_name(info.dtype),
             "shard": info.spec.to_json(),
             "files": {shard_key(r, info.pp_rank): _file(info, r) for r in ranks}}
    if split != tp_size:
        entry["split_size"] = split
    return entry


def _write_shards(reader: CheckpointReader, tmp: Path, sizes: dict[str, int], progress: bool
                  ) -> tuple[dict[str, dict], dict[str, list[int]]]:
    """Write every output shard file (tensor `name` split over `sizes[name]` ranks); (their records,
    from the bytes written; `_holders`)."""
    infos = [reader.tensors[n] for n in sorted(reader.tensors)]
    for info in infos:
        try:
            info.local_shape(sizes[info.name])
        except ValueError as exc:
            group = "expert-TP" if _is_expert(info) else "TP"
            raise CheckpointError(f"tensor {info.name!r} cannot be split over {sizes[info.name]} {group} ranks: "
                                  f"{exc}") from None
    holders = _holders(infos, sizes)
    writers = {rel: SafetensorsWriter(tmp / rel, layout) for rel, layout in _plan(infos, holders, sizes).items()}
    try:
        with reader.deferred_verification():  # nothing is published before the inputs are verified
            for info in tqdm(infos, desc="reshard", disable=not progress, leave=False):
                full = reader.read_full(info.name)
                size = sizes[info.name]
                for r in holders[info.name]:
                    piece = full if size == 1 or info.spec.replicated else info.spec.shard(full, r, size)
                    writers[_file(info, r)].write(info.name, piece)
    except BaseException:
        for w in writers.values():
            w.discard()
        raise
    return {rel: w.close() for rel, w in writers.items()}, holders


def reshard(directory: str | Path, out_directory: str | Path, tp_size: int, progress: bool = True, *,
            overwrite: bool = False, expert_tp_size: int | None = None) -> Path:
    """Write `directory`'s adapters as a new checkpoint for TP size `tp_size` (same format), the
    routed experts' adapters split over `expert_tp_size` ranks (None: `tp_size`), whatever split
    they were saved with.

    The PP split, names, adapter config and recorded base model (hf_config.json) are kept; train
    state (per-rank optimizer/RNG) does not carry over to another TP size and is dropped.  The
    output is checked first (`outputs.check_output_dir`: never an input, its run directory or
    unrelated data; a previous consolidate output only with `overwrite`) and published atomically
    like a save, without touching any `latest` pointer; a failure leaves no temporary and no
    directory it created."""
    expert_tp_size = tp_size if expert_tp_size is None else expert_tp_size
    for key, value in (("tp_size", tp_size), ("expert_tp_size", expert_tp_size)):
        if type(value) is not int or value < 1:
            raise CheckpointError(f"{key} must be a positive int, got {value!r}")
    out = check_output_dir(out_directory, "consolidate",
                           checkpoint_inputs(directory), overwrite)
    with CheckpointReader(directory) as reader:
        created = make_parents(out)
        tmp = None
        try:
            tmp = make_tmp_dir(out)
            sizes = {n: expert_tp_size if _is_expert(i) else tp_size for n, i in reader.tensors.items()}
            files, holders = _write_shards(reader, tmp, sizes, progress)
            files[CONFIG_FILE] = write_json(tmp / CONFIG_FILE, reader.config())
            files.update(copy_base_files(reader, tmp))  # the recorded base model travels along
            tensors = {n: _index_entry(info, holders[n], sizes[n], tp_size) for n, info in reader.tensors.items()}
            index = build_index(tp_size, reader.pp_size, 1, tensors, files)
            publish(tmp, out, index, update_latest=False)
        except BaseException:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            remove_created(created)
            raise
    mark_output(out, "consolidate")
    return out
