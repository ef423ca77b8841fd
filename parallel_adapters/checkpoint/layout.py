"""Checkpoint directory layout and index schema (pure: files and JSON only, no torch.distributed).

One directory per save (docs/design.md section 6)::

    <dir>/adapter_config.json                      the caller's config dict
    <dir>/hf_config.json                           the base model's HF config.json (optional,
                                                   checkpoint/base_model.py)
    <dir>/index.json                               written LAST: its presence marks a complete save
    <dir>/shards/tp{ii}-pp{jj}.safetensors         DP rank 0 of each (tp, pp) rank
    <dir>/train_state/optim-tp{ii}-pp{jj}-dp{kk}.safetensors / .json   optimizer tensors / scalars
    <dir>/train_state/rng-tp{ii}-pp{jj}-dp{kk}.safetensors             RNG states as uint8 tensors
    <dir>/train_state/extra_state.json             the caller's JSON dict (world rank 0)
    <parent>/latest                                the name of the newest complete directory

Everything a loader trusts is checked here before any tensor is allocated: the index structure,
every relative path (no absolute paths, no `..`, must stay inside the directory: storage/paths.py),
shapes against the ShardSpec, dtypes against a fixed table (storage/safetensors_format.py).
Errors are `CheckpointError` (defined in storage/errors.py) naming file and tensor.
"""
from __future__ import annotations

import math
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from parallel_adapters.distributed.sharding import ShardedTensor, ShardSpec
from parallel_adapters.storage.errors import CheckpointError
from parallel_adapters.storage.paths import check_relpath
from parallel_adapters.storage.safetensors_format import DTYPES, dtype_name

# 2: a TP-replicated tensor may live in any one TP rank's file (1: always TP rank 0's).
FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
INDEX_FILE = "index.json"
CONFIG_FILE = "adapter_config.json"
HF_CONFIG_FILE = "hf_config.json"
SHARDS_DIR = "shards"
TRAIN_STATE_DIR = "train_state"
EXTRA_STATE_FILE = f"{TRAIN_STATE_DIR}/extra_state.json"
LATEST_FILE = "latest"
TMP_MARKER = ".tmp-"
OLD_MARKER = ".old-"

_SHARD_KEY = re.compile(r"^tp(\d+)-pp(\d+)$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_INDEX_KEYS = {"format_version", "tp_size", "pp_size", "dp_size", "tensors", "files", "train_state"}
_TENSOR_KEYS = {"global_shape", "dtype", "shard", "files"}
_OPTIONAL_TENSOR_KEYS = {"split_size"}  # a routed expert's tensor split over expert-TP != tp_size


# ----------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------

def shard_key(tp_rank: int, pp_rank: int) -> str:
    return f"tp{tp_rank:02d}-pp{pp_rank:02d}"


def rank_key(tp_rank: int, pp_rank: int, dp_rank: int) -> str:
    return f"tp{tp_rank:02d}-pp{pp_rank:02d}-dp{dp_rank:02d}"


_parsed_shard_keys: dict[str, tuple[int, int]] = {}  # an index repeats a few keys many times


def parse_shard_key(key: str) -> tuple[int, int]:
    if type(key) is str and key in _parsed_shard_keys:
        return _parsed_shard_keys[key]
    m = _SHARD_KEY.match(key) if isinstance(key, str) else None
    if m is None:
        raise CheckpointError(f"index.json: bad shard key {key!r} (expected 'tpII-ppJJ')")
    if len(_parsed_shard_keys) < 4096:
        _parsed_shard_keys[key] = (int(m.group(1)), int(m.group(2)))
    return int(m.group(1)), int(m.group(2))


def shard_file(tp_rank: int, pp_rank: int) -> str:
    return f"{SHARDS_DIR}/{shard_key(tp_rank, pp_rank)}.safetensors"


def expert_shard_file(tp_rank: int, pp_rank: int, ep_rank: int) -> str:
    """The file of the routed-expert tensors held by expert-parallel rank `ep_rank` (the index maps
    each tensor by its global name, so a loader at another EP size finds its experts by name)."""
    return f"{SHARDS_DIR}/{shard_key(tp_rank, pp_rank)}-ep{ep_rank:02d}.safetensors"


def optim_files(tp_rank: int, pp_rank: int, dp_rank: int) -> tuple[str, str]:
    """(tensors, scalars) relative paths of one rank's optimizer state."""
    stem = f"{TRAIN_STATE_DIR}/optim-{rank_key(tp_rank, pp_rank, dp_rank)}"
    return f"{stem}.safetensors", f"{stem}.json"


def rng_file(tp_rank: int, pp_rank: int, dp_rank: int) -> str:
    return f"{TRAIN_STATE_DIR}/rng-{rank_key(tp_rank, pp_rank, dp_rank)}.safetensors"


def tmp_dir_for(final: Path, token: str | None = None) -> Path:
    """The hidden sibling a save writes into; never a valid checkpoint (no index until the end)."""
    return final.parent / f".{final.name}{TMP_MARKER}{token or uuid.uuid4().hex[:12]}"


# ----------------------------------------------------------------------------------------------
# Index: one tensor's entry
# ----------------------------------------------------------------------------------------------

def tensor_entry(t: ShardedTensor, name: str, tp_rank: int, tp_size: int, pp_rank: int,
                 rel: str | None = None, split_size: int | None = None) -> dict:
    """The index entry a writer rank contributes for `name` (its own file `rel`, by default its
    shard file).  `split_size`: the size of the group that splits this tensor when it is not the
    TP group's (a routed expert's, over expert-TP); `tp_rank` is then the rank in that group."""
    entry = {
        "global_shape": [int(s) for s in t.global_shape],
        "dtype": dtype_name(t.local.dtype),
        "shard": t.spec.to_json(),
        "files": {shard_key(tp_rank, pp_rank): rel or shard_file(tp_rank, pp_rank)},
    }
    if split_size is not None and split_size != tp_size:
        entry["split_size"] = split_size
    return entry


@dataclass(frozen=True)
class TensorInfo:
    """A validated index entry: where each checkpoint TP rank's piece of one tensor lives."""

    name: str
    global_shape: tuple[int, ...]
    dtype: torch.dtype
    spec: ShardSpec
    pp_rank: int
    files: dict[int, str]  # checkpoint split rank (TP rank, or expert-TP rank) -> relative file
    split_size: int = 1
    """How many pieces the checkpoint holds: its tp_size, or a routed expert's expert-TP size."""

    def local_shape(self, tp_size: int) -> tuple[int, ...]:
        return self.spec.local_shape(self.global_shape, tp_size)

    @property
    def nbytes(self) -> int:
        return math.prod(self.global_shape) * torch.empty((), dtype=self.dtype).element_size()

    @property
    def replica_rank(self) -> int:
        """The checkpoint TP rank whose file holds this replicated tensor (its only entry)."""
        return next(iter(self.files))


def replica_owners(sizes: Mapping[str, int], tp_size: int) -> dict[str, int]:
    """Which TP rank's shard file holds each TP-replicated tensor (name -> bytes): largest first,
    each to the least-loaded rank (ties: the lower rank), so the writers share the bytes evenly.
    Deterministic in the names and sizes alone, so every TP rank computes the same answer."""
    load = [0] * tp_size
    owners = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        rank = min(range(tp_size), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += sizes[name]
    return owners


def parse_tensor_entry(name: str, entry: Any, tp_size: int, pp_size: int) -> TensorInfo:
    """Check one index entry against the schema and the checkpoint's TP/PP sizes."""
    where = f"index.json: tensor {name!r}"
    if not isinstance(entry, dict) or not _TENSOR_KEYS <= set(entry) <= _TENSOR_KEYS | _OPTIONAL_TENSOR_KEYS:
        got = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise CheckpointError(f"{where}: entry must have exactly {sorted(_TENSOR_KEYS)} (and optionally "
                              f"{sorted(_OPTIONAL_TENSOR_KEYS)}), got {got}")
    split = entry.get("split_size", tp_size)
    if type(split) is not int or split < 1:
        raise CheckpointError(f"{where}: split_size must be a positive int, got {split!r}")
    shape = entry["global_shape"]
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        raise CheckpointError(f"{where}: global_shape {shape!r} is not a list of non-negative ints")
    if entry["dtype"] not in DTYPES:
        raise CheckpointError(f"{where}: unsupported dtype {entry['dtype']!r} (supported: {sorted(DTYPES)})")
    try:
        spec = ShardSpec.from_json(entry["shard"])
        if spec.dim is not None and not 0 <= spec.dim < len(shape):
            raise ValueError(f"split dim {spec.dim} out of range for {len(shape)}-d shape {shape}")
        spec.local_shape(shape, split)
    except (ValueError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{where}: bad shard spec {entry['shard']!r} at split size {split}: {exc}") from None
    files = entry["files"]
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{where}: 'files' must be a non-empty mapping of shard key -> file")
    by_tp: dict[int, str] = {}
    pp_ranks = set()
    for key, rel in files.items():
        tp, pp = parse_shard_key(key)
        if tp >= split or pp >= pp_size:
            size = f"tp_size {tp_size}" if split == tp_size else f"split_size {split}"
            raise CheckpointError(f"{where}: shard key {key} outside {size} / pp_size {pp_size}")
        by_tp[tp] = check_relpath(rel, f"file of tensor {name!r}")
        pp_ranks.add(pp)
    if len(pp_ranks) != 1:
        raise CheckpointError(f"{where}: held by several pipeline stages {sorted(pp_ranks)}")
    if spec.replicated and len(by_tp) != 1:
        raise CheckpointError(f"{where}: a replicated tensor is stored once, found it for tp ranks {sorted(by_tp)}")
    if not spec.replicated and set(by_tp) != set(range(split)):
        raise CheckpointError(f"{where}: shards for tp ranks {sorted(by_tp)}, expected {list(range(split))}")
    return TensorInfo(name, tuple(shape), DTYPES[entry["dtype"]], spec, pp_ranks.pop(), by_tp, split)


# ----------------------------------------------------------------------------------------------
# Index: the whole document
# ----------------------------------------------------------------------------------------------

def build_index(
    tp_size: int, pp_size: int, dp_size: int, tensors: Mapping[str, dict],
    files: Mapping[str, dict], train_state: Mapping[str, Any] | None = None,
) -> dict:
    """Assemble and validate the index document (raises CheckpointError if inconsistent)."""
    index = {
        "format_version": FORMAT_VERSION,
        "tp_size": tp_size, "pp_size": pp_size, "dp_size": dp_size,
        "tensors": {k: tensors[k] for k in sorted(tensors)},
        "files": {k: files[k] for k in sorted(files)},
        "train_state": dict(train_state or {"optimizer": {}, "rng": {}, "extra_state": None}),
    }
    validate_index(index)
    return index


def _check_size(index: dict, key: str) -> int:
    value = index.get(key)
    if type(value) is not int or value < 1:
        raise CheckpointError(f"index.json: {key} must be a positive int, got {value!r}")
    return value


def _referenced_files(index: dict) -> Iterable[tuple[str, str]]:
    """(relative path, what refers to it) for every file the index points at."""
    for name, entry in index["tensors"].items():
        for rel in entry["files"].values():
            yield rel, f"tensor {name!r}"
    state = index["train_state"]
    for key, rels in state["optimizer"].items():
        yield rels["tensors"], f"optimizer state {key}"
        yield rels["scalars"], f"optimizer state {key}"
    for key, rel in state["rng"].items():
        yield rel, f"rng state {key}"
    if state["extra_state"] is not None:
        yield state["extra_state"], "extra_state"


def _validate_train_state(state: Any) -> None:
    if not isinstance(state, dict) or set(state) != {"optimizer", "rng", "extra_state"}:
        raise CheckpointError(f"index.json: train_state must have keys optimizer, rng, extra_state; got {state!r}")
    for key, rels in state["optimizer"].items():
        if not isinstance(rels, dict) or set(rels) != {"tensors", "scalars"}:
            raise CheckpointError(f"index.json: optimizer state {key!r} must name 'tensors' and 'scalars'")
        for rel in rels.values():
            check_relpath(rel, f"optimizer state file of {key}")
    for key, rel in state["rng"].items():
        check_relpath(rel, f"rng state file of {key}")
    if state["extra_state"] is not None:
        check_relpath(state["extra_state"], "extra_state file")


def validate_index(index: Any) -> dict[str, TensorInfo]:
    """Check the whole index schema; returns the parsed tensor entries by name."""
    if not isinstance(index, dict):
        raise CheckpointError(f"index.json: top level must be an object, got {type(index).__name__}")
    if index.get("format_version") not in READABLE_FORMAT_VERSIONS:
        raise CheckpointError(f"index.json: unsupported format_version {index.get('format_version')!r} "
                              f"(this code reads {', '.join(map(str, READABLE_FORMAT_VERSIONS))})")
    if set(index) != _INDEX_KEYS:
        raise CheckpointError(f"index.json: keys {sorted(index)}, expected {sorted(_INDEX_KEYS)}")
    tp_size, pp_size = _check_size(index, "tp_size"), _check_size(index, "pp_size")
    _check_size(index, "dp_size")
    files, tensors = index["files"], index["tensors"]
    if not isinstance(files, dict) or not isinstance(tensors, dict):
        raise CheckpointError("index.json: 'files' and 'tensors' must be objects")
    for rel, rec in files.items():
        check_relpath(rel, "file")
        if (not isinstance(rec, dict) or set(rec) != {"sha256", "bytes"} or not isinstance(rec["sha256"], str)
                or not _SHA256.match(rec["sha256"]) or type(rec["bytes"]) is not int or rec["bytes"] < 0):
            raise CheckpointError(f"index.json: record of file {rel!r} must be {{sha256: hex64, bytes: int}}, got {rec!r}")
    infos = {name: parse_tensor_entry(name, entry, tp_size, pp_size) for name, entry in tensors.items()}
    _validate_train_state(index["train_state"])
    for rel, what in _referenced_files(index):
        if rel not in files:
            raise CheckpointError(f"index.json: {what} refers to {rel!r}, which has no checksum in 'files'")
    return infos
