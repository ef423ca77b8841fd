"""storage/writeback.py: writeback is started block by block; the bytes on disk are exact."""
from __future__ import annotations

import os

from parallel_adapters.storage import writeback


def test_writeback_is_started_block_by_block_and_the_bytes_are_exact(tmp_path, monkeypatch):
    kicks = []
    monkeypatch.setattr(writeback, "_sync_file_range", lambda fd, offset, nbytes, flags: kicks.append((offset, nbytes, flags)) or 0)
    block = writeback._WRITEBACK_BLOCK
    pieces = [os.urandom(n) for n in (100, block + 7, 3 * block // 2, 5, 2 * block)]
    with writeback.WritebackFile(tmp_path / "w.bin") as fh:
        for piece in pieces:
            fh.write(piece)
        assert fh.size == sum(map(len, pieces))
    data = b"".join(pieces)
    assert (tmp_path / "w.bin").read_bytes() == data
    assert kicks and all(flags == 2 for _, _, flags in kicks)  # SYNC_FILE_RANGE_WRITE: start, do not wait
    assert [k[0] for k in kicks] == [0] + [sum(k[1] for k in kicks[:i]) for i in range(1, len(kicks))]
    assert all(n >= block for _, n, _ in kicks)
    assert len(data) - sum(n for _, n, _ in kicks) < block  # only the tail is left for fsync
