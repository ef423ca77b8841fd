"""Path safety: relative paths read from an index file (ours or a Hugging Face weight map) are
plain POSIX paths that stay inside their directory, symlinks followed."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from parallel_adapters.storage.errors import CheckpointError

_good_relpaths: set[str] = set()  # paths already accepted (an index repeats a few paths many times)


def check_relpath(rel: Any, what: str = "path") -> str:
    """Refuse anything but a plain relative POSIX path made of normal components."""
    if type(rel) is str and rel in _good_relpaths:
        return rel
    if not isinstance(rel, str) or not rel:
        raise CheckpointError(f"index.json: {what} {rel!r} is not a non-empty string")
    if "\x00" in rel or "\\" in rel or rel.startswith("/") or re.match(r"^[A-Za-z]:", rel):
        raise CheckpointError(f"index.json: {what} {rel!r} is absolute or not a POSIX relative path")
    if any(part in ("", ".", "..") for part in rel.split("/")):
        raise CheckpointError(f"index.json: {what} {rel!r} contains '.', '..' or empty components")
    if type(rel) is str and len(_good_relpaths) < 4096:
        _good_relpaths.add(rel)
    return rel


def resolve_inside(directory: Path, rel: str) -> Path:
    """`directory/rel`, refused unless it resolves (symlinks followed) inside `directory`."""
    check_relpath(rel)
    root = Path(directory).resolve()
    target = (root / rel).resolve()
    if target != root and root not in target.parents:
        raise CheckpointError(f"{rel!r} resolves to {target}, outside the checkpoint directory {root}")
    return target


def check_plain_name(name: str, what: str) -> str:
    if not name or "/" in name or "\\" in name or name in (".", "..") or "\x00" in name:
        raise CheckpointError(f"{what}: {name!r} is not a plain directory name")
    return name
