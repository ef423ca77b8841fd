"""Offline tools (single process, no torch.distributed): shards -> full tensors; reshard to any TP.

Streaming: tensors are processed one at a time, and `reshard` writes its output files with a
header computed up front from the index, appending each tensor's bytes as it goes, so memory stays
at one tensor's shards however large the checkpoint is.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
from pathlib import Path
from typing import Iterator, Sequence

import torch
from tqdm import tqdm

from parallel_adapters.checkpoint.layout import (
    CONFIG_FILE, SAFETENSORS_CODES, CheckpointError, TensorInfo, dtype_name, file_record, fsync_path,
    build_index, shard_file, shard_key, write_json,
)
from parallel_adapters.checkpoint.reader import CheckpointReader
from parallel_adapters.checkpoint.writer import make_tmp_dir, publish


def iter_full_tensors(directory: str | Path, progress: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(Megatron name, full tensor) pairs, one at a time, in name order."""
    with CheckpointReader(directory) as reader:
        names = sorted(reader.tensors)
        for name in tqdm(names, desc="consolidate", disable=not progress, leave=False):
            yield name, reader.read_full(name)


def consolidate(directory: str | Path, progress: bool = False) -> dict[str, torch.Tensor]:
    """Every adapter tensor, unsharded, keyed by its Megatron module path."""
    return dict(iter_full_tensors(directory, progress))


class StreamingSafetensorsWriter:
    """A safetensors file written tensor by tensor: the header (names, dtypes, shapes, offsets) is
    fixed at creation, then `write` must be called for each tensor in header order."""

    def __init__(self, path: Path, layout: Sequence[tuple[str, torch.dtype, tuple[int, ...]]]) -> None:
        self.path = path
        self._order = [(name, dtype, tuple(shape)) for name, dtype, shape in layout]
        header: dict[str, dict] = {}
        offset = 0
        for name, dtype, shape in self._order:
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": SAFETENSORS_CODES[dtype_name(dtype)], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # safetensors aligns the data section to 8 bytes
        self._fh = open(path, "wb")
        self._fh.write(struct.pack("<Q", len(blob)))
        self._fh.write(blob)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want = self._order[self._next] if self._next < len(self._order) else None
        got = (name, tensor.dtype, tuple(tensor.shape))
        if want != got:
            raise CheckpointError(f"{self.path}: writing {got}, header expects {want}")
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        self._fh.write(memoryview(flat.view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> None:
        if self._fh.closed:
            return
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        if self._next != len(self._order):
            raise CheckpointError(f"{self.path}: closed after {self._next} of {len(self._order)} tensors")


def _plan(infos: Sequence[TensorInfo], tp_size: int) -> dict[str, list]:
    """Output file -> [(name, dtype, local shape)] in name order; replicated tensors only at TP 0."""
    plan: dict[str, list] = {}
    for info in infos:
        ranks = [0] if info.spec.replicated else range(tp_size)
        for r in ranks:
            plan.setdefault(shard_file(r, info.pp_rank), []).append(
                (info.name, info.dtype, info.local_shape(tp_size)))
    return plan


def _index_entry(info: TensorInfo, tp_size: int) -> dict:
    ranks = [0] if info.spec.replicated else range(tp_size)
    return {"global_shape": list(info.global_shape), "dtype": dtype_name(info.dtype),
            "shard": info.spec.to_json(),
            "files": {shard_key(r, info.pp_rank): shard_file(r, info.pp_rank) for r in ranks}}


def _write_shards(reader: CheckpointReader, tmp: Path, tp_size: int, progress: bool) -> dict[str, dict]:
    infos = [reader.tensors[n] for n in sorted(reader.tensors)]
    for info in infos:
        try:
            info.local_shape(tp_size)
        except ValueError as exc:
            raise CheckpointError(f"tensor {info.name!r} cannot be split over {tp_size} TP ranks: {exc}") from None
    writers = {rel: StreamingSafetensorsWriter(tmp / rel, layout) for rel, layout in _plan(infos, tp_size).items()}
    try:
        for info in tqdm(infos, desc=f"reshard to tp {tp_size}", disable=not progress, leave=False):
            full = reader.read_full(info.name)
            ranks = [0] if info.spec.replicated else range(tp_size)
            for r in ranks:
                writers[shard_file(r, info.pp_rank)].write(info.name, info.spec.shard(full, r, tp_size))
    finally:
        for w in writers.values():
            w.close()
    for rel in writers:
        fsync_path(tmp / rel)
    return {rel: file_record(tmp / rel) for rel in writers}


def reshard(directory: str | Path, out_directory: str | Path, tp_size: int, progress: bool = True) -> Path:
    """Write `directory`'s adapters as a new checkpoint for TP size `tp_size` (same format).

    The PP split and names are kept; train state (per-rank optimizer/RNG) does not carry over to
    another TP size and is dropped.  The output is published atomically like a save, without
    touching any `latest` pointer.
    """
    if type(tp_size) is not int or tp_size < 1:
        raise CheckpointError(f"tp_size must be a positive int, got {tp_size!r}")
    out = Path(out_directory).absolute()
    if out.resolve() == Path(directory).resolve():
        raise CheckpointError(f"reshard: output {out} is the input directory")
    with CheckpointReader(directory) as reader:
        tmp = make_tmp_dir(out)
        try:
            files = _write_shards(reader, tmp, tp_size, progress)
            files[CONFIG_FILE] = write_json(tmp / CONFIG_FILE, reader.config())
            tensors = {n: _index_entry(info, tp_size) for n, info in reader.tensors.items()}
            index = build_index(tp_size, reader.pp_size, 1, tensors, files)
            publish(tmp, out, index, update_latest=False)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return out
