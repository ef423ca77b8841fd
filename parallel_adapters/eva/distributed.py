"""The cross-rank parts of EVA: DP sketch exchange, TP-distributed SVD of feature shards, and
collective decisions.  No raw activation ever crosses a rank boundary.

What moves per step (q = ceil(sketch_multiple * cap), s = q + OVERSAMPLE, I_i = this rank's
input width, n = this rank's kept tokens of the layer, p = POWER_ITERS, L = target layers):
- data parallel (and the TP group of a sequence-parallel column layer, whose tokens are split):
  ONE all-gather of every active layer's packed sketch, q*I_i + q + I_i + 3 fp32 words per layer;
- row-parallel layers (feature shards over TP; the algorithm is in tp_svd.py), inside the layer's forward hook (so only one
  layer's rows are ever held): 1 + p all-reduces of [n, s] and one of [s, s] (+2) fp64 words;
  after the DP gather the same, coalesced over layers, on the (c + dp*(q+1) + 1)-row stacked
  sketch; one [3, c] fp64 all-reduce per layer for the convergence cosines (coalesced);
- decisions: ONE MAX all-reduce of L x (2*cap + 1) fp64 words over TP, DP and PP (hierarchically),
  so every rank decides from bit-identical numbers and no rank leaves a loop alone.
So per layer per step O(q * (I_i + n)) words, never O(world * n * I).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from parallel_adapters.distributed import collectives as C
from parallel_adapters.distributed.groups import ParallelGroups
from parallel_adapters.eva.statistics import PCASketch, component_similarity, merge
from parallel_adapters.eva.tp_svd import F64, _gather, merge_job, row_similarities, shared_omega, tp_svd, update_job



# ----------------------------------------------------------------------------------------------
# Decisions: the same vector on every rank
# ----------------------------------------------------------------------------------------------

def agree_max_(vec: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    """MAX over every rank of the model (TP, then DP, then PP): the same vector everywhere."""
    for group, size in ((groups.tp_group, groups.tp_size), (groups.dp_group, groups.dp_size),
                        (groups.pp_group, groups.pp_size)):
        if size > 1:
            C.all_reduce_max_(vec, group)
    return vec


# ----------------------------------------------------------------------------------------------
# Sketch packing (fixed shapes, so empty or short sketches gather like full ones)
# ----------------------------------------------------------------------------------------------

WIRE = torch.float32
"""Sketches travel in fp32 (components are unit rows; ~1e-7 relative is far below what EVA
resolves) and are merged in fp64 again: half the bytes of fp64."""
_N_SPLIT = 1 << 20  # n_samples travels as two fp32-exact parts


def pack_sketch(sk: PCASketch | None, q: int, n_features: int, device=None) -> torch.Tensor:
    """[q*I + q + I + 3] (WIRE): components (zero-padded to q rows), singular values, mean, n, total."""
    out = torch.zeros(q * n_features + q + n_features + 3, dtype=WIRE, device=device)
    if sk is None or sk.n_samples == 0:
        return out
    k = min(q, sk.n_components)
    out[: k * n_features] = sk.components[:k].reshape(-1)
    out[q * n_features: q * n_features + k] = sk.singular_values[:k]
    out[q * n_features + q: -3] = sk.mean
    out[-3], out[-2] = float(sk.n_samples // _N_SPLIT), float(sk.n_samples % _N_SPLIT)
    out[-1] = sk.total_sq_dev
    return out


def unpack_sketch(flat: torch.Tensor, q: int, n_features: int) -> PCASketch:
    flat = flat.to(F64)
    comps = flat[: q * n_features].view(q, n_features)
    sv = flat[q * n_features: q * n_features + q]
    mean = flat[q * n_features + q: -3]
    n = int(round(float(flat[-3]))) * _N_SPLIT + int(round(float(flat[-2])))
    return PCASketch(comps, sv, mean, n, flat[-1].clone())


def exchange(flats: Sequence[torch.Tensor], group, size: int) -> list[list[torch.Tensor]]:
    """ONE all-gather of several packed sketches; result[layer][rank]."""
    if not flats:
        return []
    if size == 1:
        return [[f] for f in flats]
    gathered = _gather(torch.cat(list(flats)), group, size)
    widths = [f.numel() for f in flats]
    per_rank = [g.split(widths) for g in gathered]
    return [[per_rank[r][i] for r in range(size)] for i in range(len(flats))]


# ----------------------------------------------------------------------------------------------
# Per-layer running state and one step of every layer
# ----------------------------------------------------------------------------------------------

@dataclass
class LayerStats:
    """The running PCA of one SVD-owning layer on this rank (components: this rank's shard).

    Rows are reduced as they arrive (in the forward hook), so no step ever holds more than one
    layer's raw inputs: exact layers fold them into their state (`direct`: nothing to merge) or
    into this step's local sketch; row layers do the same through the TP-distributed SVD (TP
    collectives inside the hook are safe: every TP rank runs the same layers in the same order).
    """

    name: str
    sharded: bool
    """Row-parallel: features split over TP (TP-distributed SVD); else exact local SVDs."""
    seq_split: bool
    """Column layer under sequence parallelism: tokens split over TP (merge sketches over TP)."""
    n_features: int
    in_features: int
    groups: ParallelGroups
    seed_of: Callable[[str, str], int]
    shard_cols: Callable | None = None
    global_index: torch.Tensor | None = None
    device: torch.device = torch.device("cpu")
    cap: int = 0
    q: int = 0
    direct: bool = False
    """Nothing to merge (one DP rank, tokens not split): PEFT's partial_fit on the rows as they come."""
    state: PCASketch | None = None
    flags: torch.Tensor | None = None
    local: PCASketch | None = None
    sim_prev: torch.Tensor | None = None
    updated: bool = False

    def configure(self, cap: int, q: int) -> None:
        """Set (or, after the first forward, shrink to) the kept components and the sketch size."""
        g = self.groups
        self.direct = g.dp_size == 1 and not (self.seq_split and g.tp_size > 1)
        self.cap, self.q = cap, q
        self.flags = torch.zeros(cap, dtype=torch.bool)
        if self.state is not None:
            self.state = _truncate(self.state, cap)
        if self.local is not None:
            self.local = _truncate(self.local, q)

    def add_rows(self, rows: torch.Tensor) -> None:
        """Fold one forward call's rows [n, I_i] into the state (direct) or this step's sketch.

        PEFT's partial_fit step on the stacked [S V; X - mean; correction], computed with the
        randomized range finder (over TP for row layers, locally otherwise), so only q (or cap)
        components of the raw rows are ever formed."""
        rows = rows.to(F64)
        if rows.shape[0] < (self.cap if self.direct else 1):  # PEFT skips batches with < cap rows
            return
        base, keep = (self.state, self.cap) if self.direct else (self.local, self.q)
        omega = _omega_fn(self, "update" if self.direct else "local", self.seed_of, rows.device)
        job, finish = update_job(base, rows, keep, omega)
        group, size = (self.groups.tp_group, self.groups.tp_size) if self.sharded else (None, 1)
        new = finish(tp_svd([job], group, size)[0])
        if self.direct:
            self.commit(new)
        else:
            self.local = new

    def commit(self, new: PCASketch) -> None:
        self.sim_prev = self.state.components if self.state is not None else None
        self.state, self.updated = new, True

    def explained_variance_ratio(self) -> torch.Tensor:
        out = torch.zeros(self.cap, dtype=F64)
        if self.state is not None and float(self.state.total_sq_dev) > 0:
            ratio = (self.state.singular_values[: self.cap].square() / self.state.total_sq_dev).cpu()
            out[: ratio.numel()] = ratio
        return out


def _truncate(sk: PCASketch, k: int) -> PCASketch:
    return PCASketch(sk.components[:k], sk.singular_values[:k], sk.mean, sk.n_samples, sk.total_sq_dev)


def _omega_fn(s: LayerStats, tag: str, seed_of: Callable[[str, str], int], device) -> Callable[[int], torch.Tensor]:
    return lambda cols: shared_omega(seed_of(s.name, tag), s.in_features, cols, s.shard_cols, device)


def process_step(active: Sequence[LayerStats], groups: ParallelGroups, tau: float) -> None:
    """After a forward: merge the step's sketches of every active layer into its state and set
    its convergence flags.  Collective: every rank of a TP/DP group passes the same layers in the
    same order (the active set is decided collectively); each phase is one coalesced collective."""
    tp, dp = (groups.tp_group, groups.tp_size), (groups.dp_group, groups.dp_size)
    mergers = [s for s in active if not s.direct]
    split = [s for s in mergers if s.seq_split]
    for s, flats in zip(split, exchange([pack_sketch(s.local, s.q, s.n_features, s.device) for s in split], *tp)):
        s.local = merge([unpack_sketch(f, s.q, s.n_features) for f in flats], s.q)
    packs = exchange([pack_sketch(s.local, s.q, s.n_features, s.device) for s in mergers], *dp)
    jobs, owners = [], []
    for s, flats in zip(mergers, packs):
        sketches = [unpack_sketch(f, s.q, s.n_features) for f in flats]
        s.local = None
        if sum(k.n_samples for k in sketches) < s.cap:  # PEFT skips batches with < cap rows
            continue
        sketches = ([s.state] if s.state is not None else []) + sketches
        if not s.sharded:
            s.commit(merge(sketches, s.cap))
            continue
        jobs.append(merge_job(sketches, s.cap, _omega_fn(s, "merge", s.seed_of, s.device)))
        owners.append(s)
    for s, (_, finish), res in zip(owners, jobs, tp_svd([j for j, _ in jobs], *tp)):
        s.commit(finish(res))
    _update_flags(active, tau, tp)


def _update_flags(active: Sequence[LayerStats], tau: float, tp) -> None:
    """PEFT's per-component test |cos(previous, current)| >= tau for every layer updated this step."""
    changed = [s for s in active if s.updated and s.sim_prev is not None]
    sharded = [s for s in changed if s.sharded]
    sims = dict(zip([s.name for s in sharded],
                    row_similarities([(s.sim_prev, s.state.components) for s in sharded], *tp)))
    for s in changed:
        sim = sims.get(s.name)
        if sim is None:
            sim = component_similarity(s.sim_prev, s.state.components, s.cap, absolute=True)
        s.flags = (sim[: s.cap] >= tau).cpu()
    for s in active:
        s.updated, s.sim_prev = False, None


def decide(stats: dict[str, LayerStats], owners: Sequence[str], caps: dict[str, int], groups: ParallelGroups,
           device) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, bool]]:
    """(explained-variance ratios, per-component convergence flags, has-state) of EVERY owner of
    every pipeline stage, identical on all ranks: one MAX-reduced vector; -1 is neutral, flags
    travel as -flag so MAX is the AND over replicas."""
    width = max(caps[o] for o in owners)
    vec = torch.full((len(owners), 2 * width + 1), -1.0, dtype=F64)
    for i, name in enumerate(owners):
        s = stats.get(name)
        if s is None:
            continue
        c = caps[name]
        vec[i, :c] = s.explained_variance_ratio()[:c]
        vec[i, width:width + c] = -s.flags.to(F64)
        vec[i, -1] = -float(s.state is not None)
    vec = agree_max_(vec.to(device), groups).cpu()
    ratios = {o: vec[i, :caps[o]].clone() for i, o in enumerate(owners)}
    flags = {o: vec[i, width:width + caps[o]] < -0.5 for i, o in enumerate(owners)}
    has_state = {o: bool(vec[i, -1] < -0.5) for i, o in enumerate(owners)}
    return ratios, flags, has_state
