"""Dropout on an adapter's input, drawn so that TP ranks agree where the input is replicated
(docs/design.md section 4, "Dropout").  Hosts make one per adapter; kinds only call it.  Also
LyCORIS' weight dropouts (module and rank dropout), which hosts draw and apply themselves."""
from __future__ import annotations

import dataclasses

import torch

from parallel_adapters.adapters import functional as lf
from parallel_adapters.adapters.kinds.protocol import AdapterSettings, AdapterView
from parallel_adapters.distributed.sharding import ShardSpec
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

    def uniform(self, n: int, device: torch.device) -> torch.Tensor:
        """n float32 draws of U[0, 1) (as torch.rand), from the next call's generator."""
        generator = torch.Generator(device=device)
        generator.manual_seed(lf.factor_seed(self.seed, str(self.calls)))
        self.calls += 1
        return torch.rand(n, generator=generator, device=device)


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


class WeightDropout:
    """LyCORIS' dropouts on a weight update (PEFT's LoHa / LoKr `module_dropout`, `rank_dropout`):
    one draw per training forward, from a stream that every TP rank of the layer shares, so the
    ranks agree on the skip and on the FULL row mask and each applies its own rows (`rank_dropped`).
    A draw is torch.rand(1 + O) (only the parts in use): u[0] > module_dropout keeps the adapter
    (PEFT's torch.rand(1) > p) and u[1:] > rank_dropout keeps dW's rows (PEFT's torch.rand(O) > p),
    divided by their mean when `rescale` (so TP sizes give the same masks from the same seed)."""

    def __init__(self, rank: float, module: float, rescale: bool, source: SeededDropout | TrackerDropout):
        self.rank, self.module, self.rescale, self.source = rank, module, rescale, source

    def draw(self, rows: int, device: torch.device) -> tuple[bool, torch.Tensor | None]:
        """(whether the adapter sits out this forward, the float64 row multiplier [rows] or None)."""
        n = (1 if self.module else 0) + (rows if self.rank else 0)
        u = self.source.uniform(n, device)
        skip = bool(self.module) and not bool(u[0] > self.module)
        if not self.rank:
            return skip, None
        keep = (u[n - rows:] > self.rank).to(torch.float64)
        return skip, (keep / keep.mean() if self.rescale else keep)


def weight_dropout(settings: AdapterSettings, stream_prefix: str, module_name: str, adapter_name: str,
                   geometry: LinearGeometry, dp_rank: int, pp_rank: int) -> WeightDropout | None:
    """The adapter's WeightDropout, or None when both probabilities are 0.  Megatron layers draw
    from the RNG-tracker stream `<stream_prefix><adapter>/tp-shared` (`expert-tp-shared` for
    routed experts), which activation recompute replays; plain layers from a private generator
    per module and call (`SeededDropout.calls`, saved for resume)."""
    if not (settings.rank_dropout or settings.module_dropout):
        return None
    if settings.rank_dropout and geometry.parallel_mode not in ("column", "row", "replicated", "conv2d"):
        raise NotImplementedError(f"module {module_name}: rank_dropout on a {geometry.parallel_mode!r} layer is not "
                                  "implemented (linear and conv2d layers only); use rank_dropout 0 or exclude "
                                  "the module")
    if geometry.parallel_mode in ("replicated", "conv2d"):
        source = SeededDropout(0.0, lf.factor_seed(settings.seed, module_name, adapter_name, "weight", f"dp{dp_rank}"))
    else:
        stream = f"{stream_prefix}{adapter_name}/{'expert-' if geometry.expert else ''}tp-shared"
        source = TrackerDropout(0.0, stream, lf.factor_seed(settings.seed, stream, f"dp{dp_rank}", f"pp{pp_rank}",
                                                            "tp-shared"))
    return WeightDropout(settings.rank_dropout, settings.module_dropout, settings.rank_dropout_scale, source)


def weight_dropped(views: list[AdapterView], dropouts: dict[str, WeightDropout | None], training: bool,
                   device: torch.device) -> list[AdapterView]:
    """A forward's running views after the weight dropouts' draws (training only): the adapters
    that sit out removed, the others carrying their row multiplier."""
    if not training:
        return views
    kept = []
    for view in views:
        dropout = dropouts.get(view.name)
        if dropout is None:
            kept.append(view)
            continue
        skip, mask = dropout.draw(view.geometry.out_features, device)
        if not skip:
            kept.append(view if mask is None else dataclasses.replace(view, rank_mask=mask))
    return kept


def rank_dropped(delta: torch.Tensor, mask: torch.Tensor | None, geometry: LinearGeometry) -> torch.Tensor:
    """dW_i times this rank's rows of the full row multiplier: a column layer holds W's rows split
    (fused blocks included), the others every row; broadcast over dW's other dimensions (a conv
    kernel's rows are its output channels, as PEFT's Conv2d)."""
    if mask is None:
        return delta
    if geometry.parallel_mode == "column":
        mask = ShardSpec(dim=0, chunks=geometry.chunks).shard(mask, geometry.tp_rank, geometry.tp_size)
    return delta * mask.to(delta.dtype).view(-1, *[1] * (delta.dim() - 1))
