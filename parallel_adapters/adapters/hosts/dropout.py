"""Dropout on an adapter's input, drawn so that TP ranks agree where the input is replicated
(docs/design.md section 4, "Dropout").  Hosts make one per adapter; kinds only call it."""
from __future__ import annotations

import torch

from parallel_adapters.adapters import functional as lf
from parallel_adapters.mcore.compat import LinearGeometry, TrackerDropout
from parallel_adapters.ops.dropout import dropout_mask_


class SeededDropout:
    """Inverted dropout for adapters on a plain nn.Linear: each call's mask from a private
    generator seeded with (seed, call count), so a resume that restores the count continues the
    masks exactly.  (Megatron layers use `compat.TrackerDropout`, which activation recompute replays.)"""

    def __init__(self, p: float, seed: int):
        self.p, self.seed, self.calls = p, seed, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator(device=x.device)
        generator.manual_seed(lf.factor_seed(self.seed, str(self.calls)))
        self.calls += 1
        return dropout_mask_(x, self.p, generator)


def input_dropout(p: float, seed: int, stream_prefix: str, module_name: str, adapter_name: str,
                  geometry: LinearGeometry, dp_rank: int, pp_rank: int) -> SeededDropout | TrackerDropout:
    """Megatron layers: a stream of Megatron's RNG tracker (replayed by activation recompute),
    named `<stream_prefix><adapter>/tp-shared` for TP-replicated inputs (the same masks on every
    TP rank, no communication) and `.../tp-rank` (one state per TP rank) for sharded ones; routed
    MoE experts use `.../expert-tp-shared` and `.../expert-tp-rank` (`dp_rank`: the expert data rank).
    Plain layers (nn.Linear, nn.Conv2d): a private generator per module and call."""
    if geometry.parallel_mode in ("replicated", "conv2d"):
        return SeededDropout(p, lf.factor_seed(seed, module_name, adapter_name, f"dp{dp_rank}", "tp0"))
    shared = tp_replicated_input(geometry)
    # routed experts draw from their own streams: expert-TP peers must agree on them, DP peers not
    group = "expert-" if geometry.expert else ""
    stream = f"{stream_prefix}{adapter_name}/{group}{'tp-shared' if shared else 'tp-rank'}"
    rank_key = "tp-shared" if shared else f"tp{geometry.tp_rank}"
    return TrackerDropout(p, stream, lf.factor_seed(seed, stream, f"dp{dp_rank}", f"pp{pp_rank}", rank_key))


def tp_replicated_input(geometry: LinearGeometry) -> bool:
    """Every TP rank sees the same input: a column layer without sequence parallelism."""
    return geometry.parallel_mode == "column" and not geometry.sequence_parallel
