"""Files written block by block with each block's disk writeback started early (Linux
sync_file_range), so a closing fsync waits for the tail only."""
from __future__ import annotations

import ctypes
import sys
from pathlib import Path
from typing import Any

_WRITEBACK_BLOCK = 16 << 20
_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of dirty pages, do not wait


def _load_sync_file_range() -> Any:
    """libc's sync_file_range on Linux, else None (then only the final fsync flushes)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()


class WritebackFile:
    """A binary file written in blocks, each block's disk writeback started as soon as it is in
    the page cache (sync_file_range, which does not wait), so that the disk works while the rest
    is written and hashed: the closing fsync then waits for the last block only, not the file.
    Advisory: fsync stays the guarantee, and the kick is skipped where the call is missing."""

    def __init__(self, path: Path) -> None:
        self._fh = open(path, "wb")
        self.size = 0
        self._kicked = 0

    def fileno(self) -> int:
        return self._fh.fileno()

    @property
    def closed(self) -> bool:
        return self._fh.closed

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), _WRITEBACK_BLOCK):
            self._fh.write(view[start:start + _WRITEBACK_BLOCK])
            self.size += min(_WRITEBACK_BLOCK, len(view) - start)
            if self.size - self._kicked >= _WRITEBACK_BLOCK:
                self._kick()

    def _kick(self) -> None:
        self._fh.flush()
        if _sync_file_range is not None:
            _sync_file_range(self._fh.fileno(), self._kicked, self.size - self._kicked, _SYNC_FILE_RANGE_WRITE)
        self._kicked = self.size

    def flush(self) -> None:
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "WritebackFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
