"""Training state for exact resume: per-rank optimizer state, RNG state, the caller's extra JSON.

Kept apart from the adapter shards because it is not resharded: it belongs to one (tp, pp, dp)
rank and loads only into the same parallel layout.  Like everything else it is stored as
safetensors + JSON (RNG states become uint8 tensors), never pickled.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Mapping

import torch

from parallel_adapters.checkpoint.layout import CheckpointError, optim_files, rank_key, rng_file
from parallel_adapters.checkpoint.files import read_json, write_json, write_safetensors
from parallel_adapters.checkpoint.reader import CheckpointReader
from parallel_adapters.distributed.groups import ParallelGroups

Scalar = int | float | bool | str | None
OptimizerState = dict[str, torch.Tensor | Scalar]
RngState = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------------------------
# RNG state <-> uint8 tensors
# ----------------------------------------------------------------------------------------------

def _json_bytes(data: Any) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps(data).encode()), dtype=torch.uint8).clone()


def _from_json_bytes(t: torch.Tensor, what: str) -> Any:
    try:
        return json.loads(bytes(t.numpy().tobytes()).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"rng state {what!r} is not valid JSON bytes ({exc})") from None


def capture_rng_state() -> RngState:
    """torch CPU (+ every CUDA device), python `random` and numpy's global RNG, as uint8 tensors."""
    state: RngState = {"torch.cpu": torch.get_rng_state().clone()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"torch.cuda.{i}"] = s.cpu().clone()
    version, internal, gauss = random.getstate()
    state["python"] = _json_bytes([version, list(internal), gauss])
    try:
        import numpy as np
    except ImportError:  # numpy is optional for the RNG part
        return state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = _json_bytes([kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)])
    return state


def restore_rng_state(state: Mapping[str, torch.Tensor]) -> None:
    """Inverse of `capture_rng_state`; refuses CUDA states this process cannot restore exactly."""
    for key, t in state.items():
        if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
            raise CheckpointError(f"rng state {key!r} must be a 1-d uint8 tensor")
    cuda = sorted(k for k in state if k.startswith("torch.cuda."))
    if cuda and (not torch.cuda.is_available() or torch.cuda.device_count() != len(cuda)):
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise CheckpointError(f"rng state holds {len(cuda)} CUDA device state(s), this process has {have}")
    if "torch.cpu" in state:
        torch.set_rng_state(state["torch.cpu"].clone())
    if cuda:
        torch.cuda.set_rng_state_all([state[f"torch.cuda.{i}"].clone() for i in range(len(cuda))])
    if "python" in state:
        version, internal, gauss = _from_json_bytes(state["python"], "python")
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = _from_json_bytes(state["numpy"], "numpy")
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# ----------------------------------------------------------------------------------------------
# Writers (one rank, into the temporary directory)
# ----------------------------------------------------------------------------------------------

def write_optimizer_state(tmp_dir: Path, tp: int, pp: int, dp: int, state: Mapping[str, Any]) -> tuple[dict, dict]:
    """Tensors to safetensors, JSON scalars to a sibling .json; returns (index entry, file records)."""
    tensors_rel, scalars_rel = optim_files(tp, pp, dp)
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    scalars = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    for key, value in scalars.items():
        if not isinstance(key, str) or not (value is None or isinstance(value, (int, float, str))):
            raise CheckpointError(
                f"{tmp_dir / scalars_rel}: optimizer state {key!r} has type {type(value).__name__}; "
                "expected a tensor or a JSON scalar (flatten nested state first)")
    files = {
        tensors_rel: write_safetensors(tmp_dir / tensors_rel, tensors),
        scalars_rel: write_json(tmp_dir / scalars_rel, scalars),
    }
    return {rank_key(tp, pp, dp): {"tensors": tensors_rel, "scalars": scalars_rel}}, files


def write_rng_state(tmp_dir: Path, tp: int, pp: int, dp: int, state: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    rel = rng_file(tp, pp, dp)
    return {rank_key(tp, pp, dp): rel}, {rel: write_safetensors(tmp_dir / rel, state)}


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

def _read_all(reader: CheckpointReader, rel: str) -> dict[str, torch.Tensor]:
    fh = reader.handle(rel)
    with reader.wrap_errors(reader.directory / rel):
        return {k: fh.get_tensor(k).clone() for k in fh.keys()}


def load_train_state(
    directory: str | Path, groups: ParallelGroups,
) -> tuple[OptimizerState | None, RngState | None, dict | None]:
    """This rank's (optimizer state, RNG state, extra_state); None for what was not saved.

    Optimizer and RNG states are per rank, so the TP/PP/DP sizes must match the save exactly.
    Call `restore_rng_state` on the returned RNG state to apply it.
    """
    with CheckpointReader(directory) as reader:
        state = reader.index["train_state"]
        key = rank_key(groups.tp_rank, groups.pp_rank, groups.dp_rank)
        sizes = (reader.tp_size, reader.pp_size, reader.dp_size)
        if (state["optimizer"] or state["rng"]) and sizes != (groups.tp_size, groups.pp_size, groups.dp_size):
            raise CheckpointError(
                f"{reader.directory}: train state was saved at tp/pp/dp {sizes}, this run is "
                f"{(groups.tp_size, groups.pp_size, groups.dp_size)}; per-rank optimizer/RNG state cannot be resharded")
        optimizer = rng = extra = None
        if state["optimizer"]:
            if key not in state["optimizer"]:
                raise CheckpointError(f"{reader.directory}: no optimizer state for rank {key}")
            rels = state["optimizer"][key]
            optimizer = _read_all(reader, rels["tensors"])
            scalars = read_json(reader.verified_path(rels["scalars"]), "optimizer scalars")
            if not isinstance(scalars, dict) or set(scalars) & set(optimizer):
                raise CheckpointError(f"{reader.directory / rels['scalars']}: bad optimizer scalars")
            optimizer.update(scalars)
        if state["rng"]:
            if key not in state["rng"]:
                raise CheckpointError(f"{reader.directory}: no rng state for rank {key}")
            rng = _read_all(reader, state["rng"][key])
        if state["extra_state"] is not None:
            extra = read_json(reader.verified_path(state["extra_state"]), "extra_state")
    return optimizer, rng, extra
