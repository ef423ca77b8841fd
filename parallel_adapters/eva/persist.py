"""Save and load an EVA state dict sharded like the adapters, so EVA is computed once and reused.

Uses the checkpoint module (`save_sharded` / `load_sharded`): every (tp, pp) rank's shard file
holds its layers' components (row layers: this rank's ShardSpec(dim=1) slice; column and plain
layers: the TP-replicated [rank, I]) and singular values; the index records global shapes and
specs, so the state loads at another TP size too.  Ranks, alphas and the stage of every layer
(all stages, rank-0 layers included) travel in the checkpoint's extra_state JSON.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from parallel_adapters.checkpoint.layout import CheckpointError
from parallel_adapters.checkpoint.reader import CheckpointReader
from parallel_adapters.checkpoint.sharded import load_sharded, load_train_state, save_sharded
from parallel_adapters.distributed import collectives as C
from parallel_adapters.distributed.groups import ParallelGroups
from parallel_adapters.distributed.sharding import REPLICATED, ShardedTensor, ShardSpec
from parallel_adapters.eva.state import EvaLayerState, EvaStateDict

FORMAT = "parallel_adapters.eva/1"
_COMPONENTS, _SINGULAR = "eva_components", "eva_singular_values"


def save_eva_state(directory: str | Path, state: Mapping[str, EvaLayerState], groups: ParallelGroups,
                   config: Mapping[str, Any] | None = None) -> Path:
    """Collective: every rank passes its own state (its stage's layers); returns the directory."""
    tensors = {}
    for name, s in state.items():
        if s.rank == 0:
            continue
        tensors[f"{name}.{_COMPONENTS}"] = ShardedTensor(s.components.contiguous(), s.spec, (s.rank, s.in_features))
        tensors[f"{name}.{_SINGULAR}"] = ShardedTensor(s.singular_values.contiguous(), REPLICATED, (s.rank,))
    meta = {name: {"rank": s.rank, "alpha": s.alpha, "r_initial": s.r_initial, "in_features": s.in_features,
                   "converged": s.converged, "spec": s.spec.to_json(), "pp_rank": groups.pp_rank}
            for name, s in state.items()}
    stages = [meta] if groups.pp_size == 1 else C.all_gather_objects(meta, groups.pp_group)
    layers = {k: v for stage in stages for k, v in stage.items()}
    extra = {"format": FORMAT, "layers": layers}
    return save_sharded(directory, tensors, groups, dict(config or {}), extra_state=extra, rng_state=False)


def load_eva_state(directory: str | Path, groups: ParallelGroups, layer_names: list[str] | None = None,
                   collective: bool = True) -> EvaStateDict:
    """This rank's EvaStateDict at the CURRENT TP size (row components resharded if needed).

    layer_names: the global module names this rank needs (e.g. its stage's adapted layers);
    default: the layers saved by this pipeline stage (same PP size required then).
    """
    _, _, extra = load_train_state(directory, groups)
    if not isinstance(extra, dict) or extra.get("format") != FORMAT:
        raise CheckpointError(f"{directory} is not an EVA state (extra_state format {FORMAT!r} missing)")
    layers: dict[str, dict] = extra["layers"]
    with CheckpointReader(directory) as reader:
        pp_size, dtypes = reader.pp_size, {n: info.dtype for n, info in reader.tensors.items()}
    if layer_names is None:
        if pp_size != groups.pp_size:
            raise CheckpointError(f"{directory} was saved at pp_size {pp_size}, this run has "
                                  f"{groups.pp_size}; pass layer_names")
        layer_names = [n for n, m in layers.items() if m["pp_rank"] == groups.pp_rank]
    unknown = sorted(set(layer_names) - set(layers))
    if unknown:
        raise CheckpointError(f"{directory} has no EVA state for {unknown}")
    expected = {}
    for name in layer_names:
        m = layers[name]
        if m["rank"] == 0:
            continue
        spec = ShardSpec.from_json(m["spec"])
        dtype = dtypes[f"{name}.{_COMPONENTS}"]
        expected[f"{name}.{_COMPONENTS}"] = (spec, (m["rank"], m["in_features"]), dtype)
        expected[f"{name}.{_SINGULAR}"] = (REPLICATED, (m["rank"],), dtype)
    local = load_sharded(directory, groups, expected, collective=collective)
    out: EvaStateDict = {}
    for name in layer_names:
        m = layers[name]
        spec = ShardSpec.from_json(m["spec"])
        if m["rank"]:
            comps, sv = local[f"{name}.{_COMPONENTS}"], local[f"{name}.{_SINGULAR}"]
        else:
            comps = torch.zeros(spec.local_shape((0, m["in_features"]), groups.tp_size), dtype=torch.float64)
            sv = torch.zeros(0, dtype=torch.float64)
        out[name] = EvaLayerState(comps, sv, int(m["rank"]), float(m["alpha"]), spec, int(m["in_features"]),
                                  int(m["r_initial"]), bool(m["converged"]))
    return out

