"""Verified, lazy reads from one checkpoint directory (single process, no torch.distributed).

Shared by `sharded.load_sharded` (each rank reads only the shards it needs, resharding on the fly)
and the offline tools in `consolidate.py`.  Every file is checked before its bytes are trusted:
path inside the directory, size and sha256 as recorded in index.json, safetensors header shape
and dtype as the index says.  Only then is a tensor materialised, one slice at a time.

Each file is hashed at most once per reader (share one reader to read several things from a
checkpoint, as `export_peft` does).  Inside `deferred_verification()` a file's
sha256 is computed on a worker thread while the caller reads from it, and the block only exits
normally once every file read inside it has been verified: nothing read there may be handed out
before that (`consolidate`, `load_sharded` and `reshard` return or publish only afterwards).
"""
from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from parallel_adapters.checkpoint.layout import (
    CONFIG_FILE, INDEX_FILE, CheckpointError, TensorInfo, validate_index
)
from parallel_adapters.checkpoint.files import file_record, read_json
from parallel_adapters.distributed.sharding import ShardSpec
from parallel_adapters.storage.paths import resolve_inside
from parallel_adapters.storage.safetensors_format import SAFETENSORS_CODES, dtype_name


class CheckpointReader:
    """Index + checksum-verified access to one checkpoint directory."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"checkpoint directory {self.directory} does not exist")
        index_path = self.directory / INDEX_FILE
        if not index_path.is_file():
            raise CheckpointError(
                f"{index_path} is missing: {self.directory} is an incomplete save or not a checkpoint")
        self.index = read_json(index_path, "checkpoint index")
        try:
            self.tensors: dict[str, TensorInfo] = validate_index(self.index)
        except CheckpointError as exc:
            raise CheckpointError(f"{index_path}: {exc}") from None
        self.tp_size: int = self.index["tp_size"]
        self.pp_size: int = self.index["pp_size"]
        self.dp_size: int = self.index["dp_size"]
        self._verified: dict[str, Path] = {}
        self._pending: dict[str, Future] = {}
        self._deferred = False
        self._pool: ThreadPoolExecutor | None = None
        self._handles: dict[str, object] = {}
        self._names_in_file: dict[str, set[str]] = {}
        for info in self.tensors.values():
            for rel in info.files.values():
                self._names_in_file.setdefault(rel, set()).add(info.name)

    # -- files -----------------------------------------------------------------------------------

    def _located(self, rel: str) -> tuple[Path, dict]:
        """(path, index record) of `rel` after the cheap checks: listed, inside, present, size."""
        record = self.index["files"].get(rel)
        if record is None:
            raise CheckpointError(f"{self.directory}: file {rel!r} is not listed in index.json")
        path = resolve_inside(self.directory, rel)
        try:
            st = path.stat()
        except FileNotFoundError:
            st = None
        if st is None or not path.is_file():
            raise CheckpointError(f"{path}: file listed in index.json is missing")
        if st.st_size != record["bytes"]:
            raise CheckpointError(
                f"{path}: {st.st_size} bytes on disk, index.json records {record['bytes']} (truncated or overwritten)")
        return path, record

    @staticmethod
    def _check_sha256(path: Path, record: dict) -> Path:
        actual = file_record(path)["sha256"]
        if actual != record["sha256"]:
            raise CheckpointError(f"{path}: sha256 {actual} does not match index.json ({record['sha256']}): corrupt")
        return path

    def _start_verification(self, rel: str) -> None:
        if rel in self._verified or rel in self._pending:
            return
        path, record = self._located(rel)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)),
                                            thread_name_prefix="ckpt-sha256")
        self._pending[rel] = self._pool.submit(self._check_sha256, path, record)

    def verify_in_background(self, rels: Iterator[str] | list[str]) -> None:
        """Start hashing `rels` on worker threads (several files in parallel); `verified_path`
        then waits for the result instead of hashing again."""
        for rel in rels:
            self._start_verification(rel)

    def verified_path(self, rel: str) -> Path:
        """Absolute path of `rel` after checking location, size and sha256 (once per file)."""
        if rel in self._verified:
            return self._verified[rel]
        future = self._pending.get(rel)
        if future is None:
            path = self._check_sha256(*self._located(rel))
        else:
            try:
                path = future.result()
            finally:
                del self._pending[rel]
        self._verified[rel] = path
        return path

    @contextmanager
    def deferred_verification(self) -> Iterator[None]:
        """Inside the block, a file's sha256 is computed on a worker thread while it is read; the
        block exits normally only after every file touched inside it passed.  The caller must not
        hand out anything read inside before then.  A checksum failure takes precedence over a
        read error it may have caused (a corrupt file is reported as corrupt)."""
        if self._deferred:
            yield
            return
        self._deferred = True
        try:
            yield
        except BaseException:
            self._deferred = False
            for rel in list(self._pending):
                self.verified_path(rel)  # raises the checksum error if there is one
            raise
        self._deferred = False
        for rel in list(self._pending):
            self.verified_path(rel)

    def verify_all(self) -> int:
        """Check every file the index lists (size and sha256, several files in parallel) and every
        shard file's safetensors header against the index (names, shapes, dtypes); CheckpointError
        naming the file on the first problem.  Returns the number of bytes verified."""
        rels = sorted(self.index["files"])
        self.verify_in_background(rels)
        for rel in rels:
            self.verified_path(rel)
        for info in self.tensors.values():
            for rel in info.files.values():
                with self.wrap_errors(self.directory / rel):
                    self._checked_slice(self.handle(rel), info, rel)
        return sum(record["bytes"] for record in self.index["files"].values())

    def config(self) -> dict:
        """adapter_config.json, checksum-verified."""
        return read_json(self.verified_path(CONFIG_FILE), "adapter config")

    def handle(self, rel: str) -> object:
        """A cached safe_open handle on a verified file whose tensor names are exactly the index's."""
        if rel in self._handles:
            return self._handles[rel]
        if self._deferred:
            self._start_verification(rel)
            path = resolve_inside(self.directory, rel)
        else:
            path = self.verified_path(rel)
        with self.wrap_errors(path):
            fh = safe_open(str(path), framework="pt")
            names = set(fh.keys())
        expected = self._names_in_file.get(rel)
        if expected is not None and names != expected:
            extra, missing = sorted(names - expected), sorted(expected - names)
            raise CheckpointError(f"{path}: tensors not in index.json {extra}; missing {missing}")
        self._handles[rel] = fh
        return fh

    @staticmethod
    @contextmanager
    def wrap_errors(path: Path) -> Iterator[None]:
        """safetensors raises its own error types for corrupt files: name the file instead."""
        try:
            yield
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot read safetensors file ({type(exc).__name__}: {exc})") from None

    def close(self) -> None:
        self._handles.clear()
        if self._pool is not None:
            for future in self._pending.values():
                future.cancel()
            self._pool.shutdown(wait=True)
            self._pool = None
        self._pending.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- tensors ---------------------------------------------------------------------------------

    def info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise CheckpointError(f"{self.directory}: tensor {name!r} is not in the checkpoint")
        return self.tensors[name]

    def _checked_slice(self, fh: object, info: TensorInfo, rel: str) -> object:
        """The header of `info`'s piece in an open file, checked against the index before reading."""
        sl = fh.get_slice(info.name)
        want_shape = list(info.local_shape(info.split_size))
        want_dtype = SAFETENSORS_CODES[dtype_name(info.dtype)]
        if list(sl.get_shape()) != want_shape or sl.get_dtype() != want_dtype:
            raise CheckpointError(
                f"{self.directory / rel}: tensor {info.name!r} is {sl.get_dtype()}{list(sl.get_shape())}, "
                f"index.json says {want_dtype}{want_shape}")
        return sl

    def _mapped_piece(self, info: TensorInfo, ckpt_tp_rank: int, dim: int | None = None,
                      start: int = 0, stop: int | None = None) -> torch.Tensor:
        """A stored piece as safetensors hands it out: a view of the file's mmap (no copy).
        Internal: it must be copied (cat / clone) before it leaves the reader."""
        rel = info.files[ckpt_tp_rank]
        fh = self.handle(rel)
        with self.wrap_errors(self.directory / rel):
            sl = self._checked_slice(fh, info, rel)
            if dim is None or not info.global_shape:
                return fh.get_tensor(info.name)
            return sl[tuple([slice(None)] * dim + [slice(start, stop)])]

    def read_piece(self, info: TensorInfo, ckpt_tp_rank: int, dim: int | None = None,
                   start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Checkpoint TP rank `ckpt_tp_rank`'s stored piece of a tensor, optionally sliced along `dim`."""
        return self._mapped_piece(info, ckpt_tp_rank, dim, start, stop).clone(memory_format=torch.contiguous_format)

    def read_full(self, name: str) -> torch.Tensor:
        """The whole tensor, unsharded via its ShardSpec (one tensor's pieces in memory at a time).
        The pieces are mmap views concatenated straight into the result: one copy per byte."""
        info = self.info(name)
        if info.spec.replicated:
            return self.read_piece(info, info.replica_rank)
        if info.split_size == 1:
            return self.read_piece(info, 0)
        pieces = [self._mapped_piece(info, r) for r in range(info.split_size)]
        dim, chunks = info.spec.dim, info.spec.chunks
        # ShardSpec.unshard in a single cat: block c of every rank, for c in order.
        parts = [p.chunk(chunks, dim=dim)[c] for c in range(chunks) for p in pieces] if chunks > 1 else pieces
        return torch.cat(parts, dim=dim)

    def read_local(self, name: str, spec: ShardSpec, tp_rank: int, tp_size: int) -> torch.Tensor:
        """Rank `tp_rank`'s piece at TP size `tp_size`, reading only the slices it needs.

        Same split as the checkpoint: for every logical block, take the overlapping ranges of the
        checkpoint ranks' pieces (get_slice), so TP 2 -> 4 reads half a file and 2 -> 1 reads both.
        A different spec (e.g. another `chunks`) goes through the full tensor instead.
        """
        info = self.info(name)
        if spec.replicated or spec != info.spec:
            full = self.read_full(name)  # a fresh tensor
            if spec.replicated:
                return full
            return spec.shard(full, tp_rank, tp_size).clone(memory_format=torch.contiguous_format)
        dim, chunks = spec.dim, spec.chunks
        spec.local_shape(info.global_shape, tp_size)  # divisibility, raises ValueError
        block = info.global_shape[dim] // chunks
        src_w, dst_w = block // info.split_size, block // tp_size
        lo, hi = tp_rank * dst_w, (tp_rank + 1) * dst_w
        pieces = []
        for c in range(chunks):
            for src in range(info.split_size):
                a, b = max(lo, src * src_w), min(hi, (src + 1) * src_w)
                if a < b:
                    off = c * src_w - src * src_w
                    pieces.append(self._mapped_piece(info, src, dim, off + a, off + b))
        if not pieces:  # zero-width dimension
            return torch.empty(spec.local_shape(info.global_shape, tp_size), dtype=info.dtype)
        if len(pieces) == 1:
            return pieces[0].clone(memory_format=torch.contiguous_format)
        return torch.cat(pieces, dim=dim)
