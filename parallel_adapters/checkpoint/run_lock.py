"""One run per checkpoint directory: an advisory lock that names its owner.

`<checkpoint.directory>/.lock` is held with `flock` by world rank 0 of the run for as long as it
runs, holds the owner's host, pid and start time, and is deleted when the run ends.  The kernel releases the lock when its owner
exits in any way (kill -9 included), so a lock whose owner is gone is stale by construction and the
next run takes it over; a live owner makes a second run refuse, naming it.  On file systems without
`flock` the fallback is an exclusive create, judged stale when its owner is a dead pid on this host.

The holder then removes what a killed save left behind: hidden `.step-*.tmp-*` / `.old-*`
directories and `.latest.tmp-*` files (no other run can be writing them while it holds the lock).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

from parallel_adapters.checkpoint.layout import OLD_MARKER, TMP_MARKER
from parallel_adapters.user_errors import UserError

LOCK_FILE = ".lock"
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS}


def _owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "started_unix": time.time()}


def _describe(owner: dict | None) -> str:
    if not owner:
        return "a run that has not yet written its name"
    return f"pid {owner.get('pid')} on host {owner.get('host')}, started {owner.get('started')}"


def _read_owner(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8") or "null")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def _pid_alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """`with RunLock(directory):` or `acquire()` / `release()`; `stale_owner` names the owner a
    stale lock was taken over from, `removed` the leftover temporaries cleaned up."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self._fd: int | None = None
        self.stale_owner: dict | None = None
        self.removed: list[str] = []

    def acquire(self) -> "RunLock":
        self.directory.mkdir(parents=True, exist_ok=True)
        previous = _read_owner(self.path)
        for _ in range(3):  # the file may be replaced between open and flock: retry on a new inode
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self._refuse(_read_owner(self.path))
            except OSError as exc:
                os.close(fd)
                if exc.errno not in _NO_FLOCK:
                    raise
                return self._acquire_exclusive()
            if os.fstat(fd).st_ino == _inode(self.path):
                self._fd = fd
                break
            os.close(fd)
        else:
            raise UserError(f"{self.path}: the lock file keeps changing; is another run starting here?")
        self.stale_owner = previous
        self._write_owner()
        self.removed = remove_leftovers(self.directory)
        return self

    def _acquire_exclusive(self) -> "RunLock":
        owner = _read_owner(self.path)
        if owner is not None:
            if owner.get("host") != socket.gethostname() or _pid_alive(owner.get("pid")):
                self._refuse(owner)
            self.path.unlink(missing_ok=True)
            self.stale_owner = owner
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            self._refuse(_read_owner(self.path))
        self._write_owner()
        self.removed = remove_leftovers(self.directory)
        return self

    def _write_owner(self) -> None:
        data = (json.dumps(_owner()) + "\n").encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)

    def _refuse(self, owner: dict | None) -> None:
        raise UserError(f"checkpoint.directory {self.directory} is in use by another run ({_describe(owner)}); "
                        "wait for it to finish, stop it, or choose another checkpoint.directory "
                        f"(the lock is {self.path} and goes away by itself when its owner exits)")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # a run that opened the old file sees its inode gone and retries
        finally:
            os.close(self._fd)  # closing releases the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def is_leftover(name: str) -> bool:
    """A hidden temporary of a save or of `latest` (`.<name>.tmp-<token>`, `.<name>.old-<token>`)."""
    return name.startswith(".") and (TMP_MARKER in name or OLD_MARKER in name)


def remove_leftovers(directory: Path) -> list[str]:
    """Delete what interrupted saves left in `directory`; their names.  Only while holding the lock."""
    removed = []
    for child in sorted(directory.iterdir()):
        if not is_leftover(child.name):
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
        removed.append(child.name)
    return removed
