"""Hugging Face safetensors model directories: lazy sliced reads and streaming sharded writes.

Reading (`HFCheckpoint`): `model.safetensors`, or shards listed by `model.safetensors.index.json`;
files are opened lazily with `safe_open` and read by slices (`get_slice`), so a tensor-parallel
rank reads only its rows/columns and an offline merge holds one tensor at a time.  Only
safetensors and JSON are read, never pickle.

Writing (`ShardedSafetensorsWriter`): the shard plan (which tensor goes to which file) is made up
front from names, dtypes and shapes, then tensors are appended one at a time.  Files carry
`{"format": "pt"}` metadata, as `save_pretrained` writes (older transformers refuse files without it).
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Iterable, Sequence

import torch
from safetensors import safe_open

from parallel_adapters.storage.errors import CheckpointError
from parallel_adapters.storage.paths import resolve_inside
from parallel_adapters.storage.safetensors_format import safetensors_header
from parallel_adapters.storage.writeback import WritebackFile

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3  # save_pretrained's "5GB"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".index.json")
Layout = Sequence[tuple[str, torch.dtype, tuple[int, ...]]]


class HFCheckpoint:
    """Read access to the tensors of a Hugging Face model directory (single file or sharded)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._handles: dict[str, object] = {}
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                data = json.loads(index.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
                raise CheckpointError(f"{index}: not readable JSON ({type(exc).__name__}: {exc})") from None
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index}: no 'weight_map' object")
            self.weight_map: dict[str, str] = dict(weight_map)
        elif (self.directory / SINGLE_FILE).is_file():
            self.weight_map = {name: SINGLE_FILE for name in self._open(SINGLE_FILE).keys()}
        else:
            raise CheckpointError(f"{self.directory}: neither {SINGLE_FILE} nor {INDEX_FILE} found "
                                  "(only safetensors checkpoints are supported)")

    def names(self) -> list[str]:
        return list(self.weight_map)

    def file_of(self, name: str) -> Path:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.directory}: tensor {name!r} is not in the checkpoint")
        return self.directory / self.weight_map[name]

    def _open(self, rel: str) -> object:
        handles = self._handles
        if rel not in handles:
            path = resolve_inside(self.directory, rel)
            try:
                handles[rel] = safe_open(str(path), framework="pt")
            except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
                raise CheckpointError(f"{path}: cannot open safetensors file ({type(exc).__name__}: {exc})") from None
        return handles[rel]

    def _slice(self, name: str) -> object:
        rel = self.weight_map.get(name)
        if rel is None:
            raise CheckpointError(f"{self.directory}: tensor {name!r} is not in the checkpoint")
        fh = self._open(rel)
        try:
            return fh.get_slice(name)
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"{self.directory / rel}: tensor {name!r} listed in {INDEX_FILE} "
                                  f"is not readable ({type(exc).__name__}: {exc})") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype_code(self, name: str) -> str:
        return self._slice(name).get_dtype()

    def read(self, name: str, start: int | None = None, stop: int | None = None,
             col_ranges: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
        """Rows [start, stop) of a tensor, restricted to `col_ranges` (read by slices)."""
        sl = self._slice(name)
        rank = len(sl.get_shape())
        rows = slice(start, stop)
        if rank == 0:
            return sl[()]
        if rank == 1 or col_ranges is None:
            return sl[rows]
        return torch.cat([sl[rows, a:b] for a, b in col_ranges], dim=1)

    def check_shapes(self, expected: dict[str, tuple[int, ...]], ignore: Iterable[str] = ()) -> None:
        """Missing, unexpected or mis-shaped tensors -> one CheckpointError listing them all."""
        ignored = set(ignore)
        problems = [f"missing tensor {n!r}" for n in expected if n not in self.weight_map]
        problems += [f"unexpected tensor {n!r} in {self.weight_map[n]}" for n in self.weight_map
                     if n not in expected and n not in ignored]
        for name, want in expected.items():
            if name in self.weight_map and self.shape(name) != tuple(want):
                problems.append(f"tensor {name!r} in {self.weight_map[name]} has shape "
                                f"{list(self.shape(name))}, config.json implies {list(want)}")
        if problems:
            raise CheckpointError(f"{self.directory} does not match its config.json:\n    " + "\n    ".join(problems))


def is_weight_file(name: str) -> bool:
    return name.endswith(_WEIGHT_SUFFIXES)


def copy_side_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy config, generation config, tokenizer files... (every regular top-level file that is
    not a weight file or weight index) from `src` to `dst`; returns the names copied."""
    copied = []
    for path in sorted(Path(src).iterdir()):
        if path.is_file() and not is_weight_file(path.name) and not path.name.startswith("."):
            shutil.copy2(path, Path(dst) / path.name)
            copied.append(path.name)
    return copied


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------

def tensor_nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def plan_shards(layout: Layout, max_shard_bytes: int) -> list[list[int]]:
    """Greedy split of `layout` (in order) into files of at most max_shard_bytes (a larger
    tensor gets a file of its own), as save_pretrained does."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, dtype, shape) in enumerate(layout):
        nbytes = tensor_nbytes(dtype, shape)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    return shards if shards[0] else []


def shard_file_names(count: int, offset: int = 0, total: int | None = None) -> list[str]:
    """`model.safetensors` for a lone file, else save_pretrained's `model-0000i-of-0000n`."""
    total = total or count
    if total == 1:
        return [SINGLE_FILE]
    return [f"model-{offset + i + 1:05d}-of-{total:05d}.safetensors" for i in range(count)]


class ShardedSafetensorsWriter:
    """Append tensors, in layout order, to the files of a fixed shard plan."""

    def __init__(self, directory: Path, layout: Layout, shards: list[list[int]], file_names: list[str]) -> None:
        if len(shards) != len(file_names):
            raise ValueError(f"{len(shards)} shards but {len(file_names)} file names")
        self.directory = Path(directory)
        self.layout = [(n, d, tuple(s)) for n, d, s in layout]
        self._shard_of = {i: k for k, idx in enumerate(shards) for i in idx}
        self._file_of = {i: file_names[k] for i, k in self._shard_of.items()}
        self._shards, self._names = shards, file_names
        self._next = 0
        self._fh = None
        self._open_file = -1

    @property
    def weight_map(self) -> dict[str, str]:
        return {self.layout[i][0]: f for i, f in self._file_of.items()}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self.layout):
            raise CheckpointError(f"{self.directory}: tensor {name!r} written after the planned {len(self.layout)}")
        want = self.layout[self._next]
        got = (name, tensor.dtype, tuple(tensor.shape))
        if got != want:
            raise CheckpointError(f"{self.directory}: writing {got}, the shard plan expects {want}")
        shard = self._shard_of[self._next]
        if shard != self._open_file:
            self._start_file(shard)
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        self._fh.write(memoryview(flat.view(torch.uint8).numpy()))
        self._next += 1

    def _start_file(self, shard: int) -> None:
        self._close_file()
        head = safetensors_header([self.layout[i] for i in self._shards[shard]], {"format": "pt"})
        self._fh = WritebackFile(self.directory / self._names[shard])
        self._fh.write(head)
        self._open_file = shard

    def _close_file(self) -> None:
        if self._fh is not None and not self._fh.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()

    def close(self) -> None:
        self._close_file()
        if self._next != len(self.layout):
            raise CheckpointError(f"{self.directory}: closed after {self._next} of {len(self.layout)} tensors")


def write_weight_index(directory: Path, weight_map: dict[str, str], total_size: int) -> Path:
    """model.safetensors.index.json as save_pretrained writes it."""
    path = Path(directory) / INDEX_FILE
    data = {"metadata": {"total_size": int(total_size)},
            "weight_map": {k: weight_map[k] for k in sorted(weight_map)}}
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path
