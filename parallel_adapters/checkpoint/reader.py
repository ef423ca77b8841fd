"""Verified, lazy reads from one checkpoint directory (single process, no torch.distributed).

Shared by `sharded.load_sharded` (each rank reads only the shards it needs, resharding on the fly)
and the offline tools in `consolidate.py`.  Every file is checked before its bytes are trusted:
path inside the directory, size and sha256 as recorded in index.json, safetensors header shape
and dtype as the index says.  Only then is a tensor materialised, one slice at a time.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from parallel_adapters.adapters.sharding import ShardSpec
from parallel_adapters.checkpoint.layout import (
    CONFIG_FILE, INDEX_FILE, SAFETENSORS_CODES, CheckpointError, TensorInfo, dtype_name,
    file_record, read_json, resolve_inside, validate_index,
)


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
        self._handles: dict[str, object] = {}
        self._names_in_file: dict[str, set[str]] = {}
        for info in self.tensors.values():
            for rel in info.files.values():
                self._names_in_file.setdefault(rel, set()).add(info.name)

    # -- files -----------------------------------------------------------------------------------

    def verified_path(self, rel: str) -> Path:
        """Absolute path of `rel` after checking location, size and sha256 (once per file)."""
        if rel in self._verified:
            return self._verified[rel]
        record = self.index["files"].get(rel)
        if record is None:
            raise CheckpointError(f"{self.directory}: file {rel!r} is not listed in index.json")
        path = resolve_inside(self.directory, rel)
        if not path.is_file():
            raise CheckpointError(f"{path}: file listed in index.json is missing")
        size = path.stat().st_size
        if size != record["bytes"]:
            raise CheckpointError(
                f"{path}: {size} bytes on disk, index.json records {record['bytes']} (truncated or overwritten)")
        actual = file_record(path)["sha256"]
        if actual != record["sha256"]:
            raise CheckpointError(f"{path}: sha256 {actual} does not match index.json ({record['sha256']}): corrupt")
        self._verified[rel] = path
        return path

    def config(self) -> dict:
        """adapter_config.json, checksum-verified."""
        return read_json(self.verified_path(CONFIG_FILE), "adapter config")

    def handle(self, rel: str) -> object:
        """A cached safe_open handle on a verified file whose tensor names are exactly the index's."""
        if rel in self._handles:
            return self._handles[rel]
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
        want_shape = list(info.local_shape(self.tp_size))
        want_dtype = SAFETENSORS_CODES[dtype_name(info.dtype)]
        if list(sl.get_shape()) != want_shape or sl.get_dtype() != want_dtype:
            raise CheckpointError(
                f"{self.directory / rel}: tensor {info.name!r} is {sl.get_dtype()}{list(sl.get_shape())}, "
                f"index.json says {want_dtype}{want_shape}")
        return sl

    def read_piece(self, info: TensorInfo, ckpt_tp_rank: int, dim: int | None = None,
                   start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Checkpoint TP rank `ckpt_tp_rank`'s stored piece of a tensor, optionally sliced along `dim`."""
        rel = info.files[ckpt_tp_rank]
        fh = self.handle(rel)
        with self.wrap_errors(self.directory / rel):
            sl = self._checked_slice(fh, info, rel)
            if dim is None or not info.global_shape:
                out = fh.get_tensor(info.name)
            else:
                out = sl[tuple([slice(None)] * dim + [slice(start, stop)])]
        return out.clone(memory_format=torch.contiguous_format)

    def read_full(self, name: str) -> torch.Tensor:
        """The whole tensor, unsharded via its ShardSpec (one tensor's pieces in memory at a time)."""
        info = self.info(name)
        if info.spec.replicated:
            return self.read_piece(info, 0)
        return info.spec.unshard([self.read_piece(info, r) for r in range(self.tp_size)]).contiguous()

    def read_local(self, name: str, spec: ShardSpec, tp_rank: int, tp_size: int) -> torch.Tensor:
        """Rank `tp_rank`'s piece at TP size `tp_size`, reading only the slices it needs.

        Same split as the checkpoint: for every logical block, take the overlapping ranges of the
        checkpoint ranks' pieces (get_slice), so TP 2 -> 4 reads half a file and 2 -> 1 reads both.
        A different spec (e.g. another `chunks`) goes through the full tensor instead.
        """
        info = self.info(name)
        if spec.replicated or spec != info.spec:
            full = self.read_full(name)
            return spec.shard(full, tp_rank, tp_size).contiguous().clone()
        dim, chunks = spec.dim, spec.chunks
        spec.local_shape(info.global_shape, tp_size)  # divisibility, raises ValueError
        block = info.global_shape[dim] // chunks
        src_w, dst_w = block // self.tp_size, block // tp_size
        lo, hi = tp_rank * dst_w, (tp_rank + 1) * dst_w
        pieces = []
        for c in range(chunks):
            for src in range(self.tp_size):
                a, b = max(lo, src * src_w), min(hi, (src + 1) * src_w)
                if a < b:
                    off = c * src_w - src * src_w
                    pieces.append(self.read_piece(info, src, dim, off + a, off + b))
        if not pieces:  # zero-width dimension
            return torch.empty(spec.local_shape(info.global_shape, tp_size), dtype=info.dtype)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)
