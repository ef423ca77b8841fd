"""The cross-rank parts of EVA: DP sketch exchange, TP-distributed SVD of feature shards, and
collective decisions.  No raw activation ever crosses a rank boundary.

Who decomposes what: a row-parallel layer's input is a feature shard, so its TP ranks decompose
it together (tp_svd.py); a column-parallel layer's input is whole on every TP rank, so ONE TP rank
(its `tp_owner`) holds its state, the ranks sharing these layers out by width.  The forward hooks
only queue rows (`StepQueue`); the queued layers are decomposed together after the forward.

What moves per step (c = cap, q = ceil(sketch_multiple * c), s = kept + OVERSAMPLE, I_i = this
rank's input width, n = this rank's kept tokens of the layer, p = power iterations, L = layers):
- row-parallel layers over TP, all queued layers at once: 1 + p all-reduces of the stacked
  [c + n + 1, s] sketches of all of them (the working dtype: fp32 for fp32/bf16 inputs), then ONE
  of their [s, s] fp64 Grams; stacks of at most 2s rows send their exact [rows, rows] Gram instead;
- data parallel (and the TP group of a sequence-parallel column layer, whose tokens are split):
  ONE all-gather of every active layer's packed sketch, q*I_i + q + I_i + 3 fp32 words per layer;
  then the merges as above, on the (c + dp*(q+1))-row stacked sketches;
- ONE [3, c] fp64 all-reduce of every row layer's convergence cosines;
- decisions: ONE MAX all-reduce of L x (2*cap + 1) fp64 words over TP, DP and PP (hierarchically),
  so every rank decides from bit-identical numbers and no rank leaves a loop alone;
- at the end, ONE all-reduce shares each column layer's components from its TP owner.
So per layer per step O(q * (I_i + n)) words, never O(world * n * I).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable, Sequence

import torch

from parallel_adapters.distributed import collectives as C
from parallel_adapters.distributed.groups import ParallelGroups
from parallel_adapters.eva.statistics import PCASketch, component_similarity, flip_signs
from parallel_adapters.eva.tp_svd import (F64, Gaussians, _gather, merge_job, row_similarities, tp_svd,
                                          update_job)



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

def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


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
# Per-layer running state, the step's queue of rows, and one step of every layer
# ----------------------------------------------------------------------------------------------

PENDING_BYTES = 256 << 20
"""Rows (in the working dtype) that the step queue holds before it decomposes them: the forward
hooks only queue their layer's rows, so the layers are decomposed together (batched by shape, one
collective per phase) at the end of the forward, or earlier when this much is waiting."""


@dataclass
class LayerStats:
    """The running PCA of one SVD-owning layer on this rank (components: this rank's shard).

    The forward hook hands this layer's rows to the `StepQueue`; when the queue is flushed they
    are folded into the state (`direct`: nothing to merge) or into this step's local sketch,
    through the TP-distributed SVD for sharded layers and locally otherwise.
    """

    name: str
    sharded: bool
    """Row-parallel: features split over TP (TP-distributed SVD); else local SVDs."""
    seq_split: bool
    """Column layer under sequence parallelism: tokens split over TP (merge sketches over TP)."""
    n_features: int
    in_features: int
    groups: ParallelGroups
    gaussians: Gaussians
    shard_key: Hashable = None
    """Names this rank's feature slice (the rows it keeps of shared Gaussian test matrices)."""
    shard_cols: Callable = _identity
    global_index: torch.Tensor | None = None
    tp_owner: int | None = None
    """The TP rank that holds this column layer's state (`assign_tp_owners`): the only one that
    decomposes its TP-replicated input, or merges the TP ranks' sketches of their sequence
    chunks.  The other TP ranks keep no state and stay neutral in `decide`.  None: every TP rank
    (a feature shard, or no TP)."""
    device: torch.device = torch.device("cpu")
    cap: int = 0
    q: int = 0
    direct: bool = False
    """Nothing to merge (one DP rank, tokens not split): PEFT's partial_fit on the rows as they come."""
    dtype: torch.dtype = torch.float32
    """Working dtype of the big products: float64 for float64 inputs, else float32."""
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

    def prepare(self, rows: torch.Tensor) -> torch.Tensor | None:
        """One forward call's rows [n, I_i] in the working dtype; None when this rank skips them
        (another TP rank owns the layer, or fewer than `cap` rows: PEFT skips such batches)."""
        if not (self.on_this_rank or self.seq_split) or rows.shape[0] < (self.cap if self.direct else 1):
            return None
        self.dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
        return rows.to(self.dtype)

    @property
    def on_this_rank(self) -> bool:
        return self.tp_owner is None or self.tp_owner == self.groups.tp_rank

    def row_job(self, rows: torch.Tensor):
        """PEFT's partial_fit step on the stacked [S V; X - mean; correction] (into the state, or
        into this step's sketch), as a job for `tp_svd.tp_svd` and its finish."""
        base, keep, tag = (self.state, self.cap, "update") if self.direct else (self.local, self.q, "local")
        warm = self.state.components if self.state is not None else None
        return update_job(base, rows, keep, self.gaussian_fn(tag, rows.device), warm)

    def absorb(self, new: PCASketch) -> None:
        if self.direct:
            self.commit(new)
        else:
            self.local = new

    def gaussian_fn(self, tag: str, device) -> Callable[[int], torch.Tensor]:
        return lambda cols: self.gaussians.get(tag, self.in_features, cols, self.shard_key, self.shard_cols,
                                               self.dtype, device)

    def commit(self, new: PCASketch) -> None:
        self.sim_prev = self.state.components if self.state is not None else None
        self.state, self.updated = new, True

    def explained_variance_ratio(self) -> torch.Tensor:
        out = torch.zeros(self.cap, dtype=F64)
        if self.state is not None and float(self.state.total_sq_dev) > 0:
            ratio = (self.state.singular_values[: self.cap].square() / self.state.total_sq_dev).cpu()
            out[: ratio.numel()] = ratio
        return out


def layer_stats(name: str, layer, groups: ParallelGroups, gaussians: Gaussians, tp_owner: int | None = None
                ) -> LayerStats:
    """This rank's statistics of one adapted layer: row-parallel inputs are feature shards (the
    slice of `layer.spec_a`); a column layer under sequence parallelism sees a chunk of the tokens
    (sketches merged over TP); other inputs are whole, on one TP rank (`tp_owner`) or on every rank."""
    g, geo = groups, layer.geometry
    seq_split = geo.parallel_mode == "column" and geo.sequence_parallel
    spec = layer.spec_a if geo.parallel_mode == "row" else None
    shard, index = _identity, torch.arange(geo.in_features)
    if spec is not None:
        shard = lambda full: spec.shard(full, g.tp_rank, g.tp_size)  # noqa: E731
        index = shard(index[None])[0]
    key = None if spec is None else (spec.dim, spec.chunks)
    return LayerStats(name, spec is not None, seq_split, index.numel(), geo.in_features, g, gaussians, key, shard,
                      index, tp_owner, device=layer.weight.device)


def assign_tp_owners(costs: Sequence[float], size: int) -> list[int]:
    """An owner rank in [0, size) for each item, greedily balancing the summed cost (largest item
    first; ties to the lowest rank): the same list on every rank that passes the same costs."""
    load = [0.0] * size
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        owners[i] = min(range(size), key=lambda r: (load[r], r))
        load[owners[i]] += costs[i]
    return owners


def _truncate(sk: PCASketch, k: int) -> PCASketch:
    return PCASketch(sk.components[:k], sk.singular_values[:k], sk.mean, sk.n_samples, sk.total_sq_dev)


class StepQueue:
    """Rows waiting for their layer's update, decomposed together by `flush`.

    Two queues: sharded layers (their flush is a TP collective, so it happens at the same point on
    every TP rank: their row counts are equal over TP, and so is the rule) and local ones.  A
    second call of a queued layer in one forward flushes first (its update needs the first's)."""

    def __init__(self, groups: ParallelGroups, budget: int | None = None):
        self.groups = groups
        self.budget = PENDING_BYTES if budget is None else budget
        self._rows: dict[bool, list] = {True: [], False: []}
        self._bytes = {True: 0, False: 0}

    def add(self, stats: LayerStats, rows: torch.Tensor) -> None:
        rows = stats.prepare(rows)
        if rows is None:
            return
        kind = stats.sharded
        if any(s is stats for s, _ in self._rows[kind]):
            self.flush(kind)
        self._rows[kind].append((stats, rows))
        self._bytes[kind] += rows.numel() * rows.element_size()
        if self._bytes[kind] > self.budget:
            self.flush(kind)

    def flush(self, *kinds: bool) -> None:
        for kind in kinds or (True, False):
            queued, self._rows[kind], self._bytes[kind] = self._rows[kind], [], 0
            jobs = [s.row_job(rows) for s, rows in queued]
            g = self.groups
            group, size = (g.tp_group, g.tp_size) if kind else (None, 1)
            for (s, _), (_, finish), res in zip(queued, jobs, tp_svd([j for j, _ in jobs], group, size)):
                s.absorb(finish(res))


def process_step(active: Sequence[LayerStats], groups: ParallelGroups, tau: float, signed: bool = False) -> None:
    """After a forward (and the queue's flush): merge the step's sketches of every active layer
    into its state and set its convergence flags.  Collective: every rank of a TP/DP group passes
    the same layers in the same order (the active set is decided collectively); each phase is one
    coalesced collective, and every layer's SVD of a phase one batched `tp_svd` call.

    A sequence-parallel layer's token chunks are sketched on every TP rank and gathered over TP;
    its TP owner merges them (straight into the state when there is no DP group to merge over)."""
    tp, dp = (groups.tp_group, groups.tp_size), (groups.dp_group, groups.dp_size)
    split = [s for s in active if not s.direct and s.seq_split]
    packs = exchange([pack_sketch(s.local, s.q, s.n_features, s.device) for s in split], *tp)
    chunks = [(s, [unpack_sketch(f, s.q, s.n_features) for f in flats]) for s, flats in zip(split, packs)]
    for s, _ in chunks:
        s.local = None
    step: dict[str, list[PCASketch]] = {}  # layer -> the step's sketches to merge into its state
    if dp[1] == 1:
        step.update((s.name, sketches) for s, sketches in chunks if s.on_this_rank)
    else:
        chunks = [(s, sk) for s, sk in chunks if s.on_this_rank and any(k.n_samples for k in sk)]
        jobs = [merge_job(sk, s.q, s.gaussian_fn("tp-merge", s.device), _warm(s), s.dtype) for s, sk in chunks]
        for (s, _), (_, finish), res in zip(chunks, jobs, tp_svd([j for j, _ in jobs], None, 1)):
            s.local = finish(res)
    active = [s for s in active if s.on_this_rank]
    mergers = [s for s in active if not s.direct and s.name not in step]
    packs = exchange([pack_sketch(s.local, s.q, s.n_features, s.device) for s in mergers], *dp)
    for s, flats in zip(mergers, packs):
        step[s.name] = [unpack_sketch(f, s.q, s.n_features) for f in flats]
        s.local = None
    merges: dict[bool, list] = {True: [], False: []}
    for s in active:
        sketches = step.get(s.name)
        if sketches is None or sum(k.n_samples for k in sketches) < s.cap:  # PEFT skips batches with < cap rows
            continue
        sketches = ([s.state] if s.state is not None else []) + sketches
        job = merge_job(sketches, s.cap, s.gaussian_fn("merge", s.device), _warm(s), s.dtype)
        merges[s.sharded].append((s, job))
    for sharded, group in ((True, tp), (False, (None, 1))):
        pairs = merges[sharded]
        for (s, (_, finish)), res in zip(pairs, tp_svd([job for _, (job, _) in pairs], *group)):
            s.commit(finish(res))
    _update_flags(active, tau, tp, signed)


def _warm(s: LayerStats) -> torch.Tensor | None:
    return s.state.components if s.state is not None else None


def _update_flags(active: Sequence[LayerStats], tau: float, tp, signed: bool) -> None:
    """PEFT's per-component test cos(previous, current) >= tau for every layer updated this step,
    on |cos|: a component whose sign flips has not changed its subspace (and the components of a
    step are not sign-fixed).  `signed` (a world of one process, where every layer is whole): PEFT
    to the letter, the signed cosine of the components sign-fixed as PEFT fixes them at every step
    (svd_flip), so a flip of a component's largest entry counts as not converged."""
    changed = [s for s in active if s.updated and s.sim_prev is not None]
    sharded = [s for s in changed if s.sharded and not signed]
    sims = dict(zip([s.name for s in sharded],
                    row_similarities([(s.sim_prev, s.state.components) for s in sharded], *tp)))
    for s in changed:
        sim = sims.get(s.name)
        if sim is None and signed:
            sim = component_similarity(flip_signs(s.sim_prev), flip_signs(s.state.components), s.cap, absolute=False)
        elif sim is None:
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
        if s is None or not s.on_this_rank:  # another stage's or another TP rank's layer
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
