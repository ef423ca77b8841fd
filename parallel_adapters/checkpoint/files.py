"""Checkpoint files on disk: durable writes, hashing, safetensors streaming, JSON.

Every checksum in index.json is computed once, by the process that writes the file, from the very
bytes it writes (no read-back); loaders verify it before trusting the file.  fsyncs of a save run
together and all finish before the step that depends on them (publication by rename).
"""
from __future__ import annotations

import contextvars
import hashlib
import json
import mmap
import os
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch

from parallel_adapters.checkpoint.layout import TMP_MARKER, CheckpointError
from parallel_adapters.storage.safetensors_format import dtype_name, safetensors_header
from parallel_adapters.storage.writeback import WritebackFile

_HASH_BLOCK = 8 << 20


def file_record(path: Path) -> dict:
    """{sha256, bytes} of a file on disk (what a loader checks; writers return the record of the
    bytes they wrote instead).  Hashes the page cache through mmap (no copy into Python)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size:
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm, memoryview(mm) as view:
                for start in range(0, len(view), _HASH_BLOCK):
                    digest.update(view[start:start + _HASH_BLOCK])
                size = len(view)
    return {"sha256": digest.hexdigest(), "bytes": size}


def fsync_path(path: Path) -> None:
    """Flush a file's or directory's data and metadata to disk (rename durability)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_durable(path: Path, data: bytes) -> dict:
    """Write `data`, fsync, return its record (hashed from `data`, not read back)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        _fsync_fd(fh.fileno())
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def write_json(path: Path, data: Any, compact: bool = False) -> dict:
    """Strict JSON (no NaN/inf), serialised before the file is opened; fsync; returns its record.
    `compact`: no indentation (json's C encoder: ~5x faster for a large document like the index)."""
    try:
        if compact:
            text = json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False) + "\n"
        else:
            text = json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n"
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: value is not strict JSON ({exc})") from None
    return write_bytes_durable(path, text.encode("utf-8"))


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw (little-endian, C-order) bytes of a tensor, without a copy when it is CPU-contiguous."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


class SafetensorsWriter:
    """A safetensors file written tensor by tensor, hashed from the bytes as they are written.

    The header (names, dtypes, shapes, offsets) is fixed at creation; `write` must then be called
    for each tensor in header order, and `close` flushes, fsyncs and returns the file's record
    {sha256, bytes} ({bytes} with checksum=False).  Memory: nothing beyond the tensor being written (no serialised copy)."""

    def __init__(self, path: Path, layout: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: Mapping[str, str] | None = None, checksum: bool = True) -> None:
        self.path = Path(path)
        self._order = [(name, dtype, tuple(int(s) for s in shape)) for name, dtype, shape in layout]
        head = safetensors_header(self._order, metadata)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = WritebackFile(self.path)
        self._fh.write(head)
        self._hash = hashlib.sha256(head) if checksum else None
        self._size = len(head)
        self._next = 0
        self.record: dict | None = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want = self._order[self._next] if self._next < len(self._order) else None
        got = (name, tensor.dtype, tuple(tensor.shape))
        if want != got:
            raise CheckpointError(f"{self.path}: writing {got}, header expects {want}")
        data = tensor_bytes(tensor)
        self._fh.write(data)
        if self._hash is not None:
            self._hash.update(data)
        self._size += data.nbytes
        self._next += 1

    def close(self) -> dict:
        """Flush + fsync + close; the record of the file (CheckpointError if tensors are missing)."""
        if not self._fh.closed:
            try:
                self._fh.flush()
                _fsync_fd(self._fh.fileno())
                self.record = {"bytes": self._size}
                if self._hash is not None:
                    self.record = {"sha256": self._hash.hexdigest(), **self.record}
            finally:
                self._fh.close()
        if self._next != len(self._order):
            raise CheckpointError(f"{self.path}: closed after {self._next} of {len(self._order)} tensors")
        return self.record

    def discard(self) -> None:
        """Close without fsync (the file is being abandoned with its temporary directory)."""
        if not self._fh.closed:
            self._fh.close()


def _checked_layout(path: Path, tensors: Mapping[str, torch.Tensor]) -> list[tuple[str, torch.dtype, tuple]]:
    layout = []
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{path}: {name!r} is a {type(t).__name__}, not a tensor")
        dtype_name(t.dtype)
        layout.append((name, t.dtype, tuple(t.shape)))
    return layout


class _FsyncBatch:
    """fsyncs running on worker threads (they wait on the disk, not the CPU), joined together."""

    def __init__(self) -> None:
        self._threads: list[threading.Thread] = []
        self._errors: list[BaseException] = []

    def add(self, fd: int) -> None:
        """fsync a duplicate of `fd` on a worker thread (the caller may close `fd` meanwhile)."""
        dup = os.dup(fd)
        thread = threading.Thread(target=self._run, args=(dup,), name="ckpt-fsync", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _run(self, fd: int) -> None:
        try:
            os.fsync(fd)
        except BaseException as exc:  # noqa: BLE001 - re-raised by join()
            self._errors.append(exc)
        finally:
            os.close(fd)

    def join(self) -> None:
        for thread in self._threads:
            thread.join()
        self._threads.clear()
        if self._errors:
            raise self._errors[0]


_fsync_batch: contextvars.ContextVar[_FsyncBatch | None] = contextvars.ContextVar("ckpt_fsync_batch", default=None)


@contextmanager
def fsync_together() -> Iterator[None]:
    """Inside the block, the durable writers here (`write_json`, `write_safetensors`, ...) start
    each file's fsync on a worker thread instead of waiting for it, so the disk flushes overlap
    hashing and the next writes; leaving the block waits for all of them (and raises the first
    fsync error).  Nothing written inside may be relied on as durable before the block exits.
    Re-entrant: an inner block joins nothing, the outermost one joins everything."""
    if _fsync_batch.get() is not None:
        yield
        return
    batch = _FsyncBatch()
    token = _fsync_batch.set(batch)
    try:
        yield
    except BaseException:
        _fsync_batch.reset(token)
        try:
            batch.join()
        except BaseException:  # noqa: BLE001 - the original error is the one to report
            pass
        raise
    _fsync_batch.reset(token)
    batch.join()


def _fsync_fd(fd: int) -> None:
    """fsync now, or hand it to the enclosing `fsync_together` block."""
    batch = _fsync_batch.get()
    if batch is None:
        os.fsync(fd)
    else:
        batch.add(fd)


def fsync_dirs(paths: Iterable[Path]) -> None:
    """fsync several directories together (their entries: the names of the files inside)."""
    with fsync_together():
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                _fsync_fd(fd)
            finally:
                os.close(fd)


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                      *, checksum: bool = True) -> dict:
    """Tensors (in the given order) to a safetensors file, durably, through `SafetensorsWriter`;
    returns the file's record {sha256, bytes} (just {bytes} with `checksum=False`).  Tensors may
    share memory (a PEFT export writes one A for q/k/v): every tensor's own bytes are written."""
    writer = SafetensorsWriter(path, _checked_layout(path, tensors), metadata, checksum)
    try:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    except BaseException:
        writer.discard()
        raise
    return writer.close()


def write_text_atomic(path: Path, text: str) -> None:
    """Write via a hidden temp sibling + os.replace: readers see the old or the new text, never half."""
    tmp = path.parent / f".{path.name}{TMP_MARKER}{uuid.uuid4().hex[:12]}"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_path(path.parent)


def read_json(path: Path, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise CheckpointError(f"{what}: {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{what}: {path} is not readable JSON ({exc})") from None
    except RecursionError:
        raise CheckpointError(f"{what}: {path} is nested too deeply to be a real one") from None
