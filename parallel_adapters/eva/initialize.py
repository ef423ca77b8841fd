"""EVA's public entries: `get_eva_state_dict` and `initialize_eva_weights` (PEFT's names and flow).

The algorithm is PEFT's (`peft/tuners/lora/eva.py`): per step, an incremental PCA of every
target layer's input; a layer converges when the |cosine| of each of its first `rank` components
between steps is >= tau (a pure sign flip is not a change of subspace; in a world of one process
the test is PEFT's signed cosine of sign-fixed components, so results equal PEFT's); ranks are redistributed over all layers by explained-variance ratio with cap
round(r * rho) and budget sum(r); A = top components (whitened if asked), B = 0; alpha is adjusted.
What is new is that it runs on an AdapterModel under TP, PP and DP without moving activations
(see `eva/distributed.py` for the wire), and that every decision is collective.

Data contract: every TP and PP rank of one data-parallel replica sees the same batches; each DP
replica sees its own slice of the global batch.  With the default input preparation, batches are
dicts with input_ids [B, S] and optional attention_mask [B, S] (1 = keep) and labels [B, S]; any
other batch works with PEFT's prepare_model_inputs_fn=None / prepare_layer_inputs_fn=None (every
row of every layer input) or the caller's own functions.
"""
from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch

from parallel_adapters.adapters.model import AdapterModel
from parallel_adapters.config import EvaConfig, LoraConfig
from parallel_adapters.distributed import collectives as C
from parallel_adapters.distributed.groups import GROUP_OF_ONE, ParallelGroups
from parallel_adapters.eva import allocation as A
from parallel_adapters.eva import distributed as D
from parallel_adapters.eva import tp_svd as T
from parallel_adapters.eva.hooks import (
    ForwardDone, InputCapture, TokenMask, layer_inputs_fns, prepare_layer_inputs_fn_language_modeling,
    prepare_model_inputs_fn_language_modeling, token_mask,
)
from parallel_adapters.eva.progress import Progress
from parallel_adapters.eva.state import EvaLayerState, EvaStateDict, eva_layers, load_into_model, peft_state_dict
from parallel_adapters.eva.statistics import whiten

ForwardFn = Callable[[torch.nn.Module, Any], Any]


@dataclass(frozen=True)
class _Layout:
    """Global view of the target layers (all pipeline stages), identical on every rank."""

    names: list[str]
    r: dict[str, int]
    alpha: dict[str, float]
    shared: dict[str, str]
    caps: dict[str, int]
    owners: list[str]

    @property
    def budget(self) -> int:
        return A.rank_budget(self.r)


# ----------------------------------------------------------------------------------------------
# Public API (PEFT's signatures; `get_eva_layer_states` is the richer per-rank record)
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def get_eva_state_dict(
    model: AdapterModel,
    dataloader: Iterable,
    peft_config: LoraConfig | None = None,
    forward_fn: ForwardFn | None = None,
    prepare_model_inputs_fn: Callable[[Any, LoraConfig], Any] | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Callable | Mapping[str, Callable] | None = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> dict[str, torch.Tensor]:
    """PEFT's result: {"base_model.model.<module>": A [rank, in_features]} (the keys PEFT gives the
    same module; float64); rank-0 layers [0, in_features].

    `get_eva_layer_states` with the same arguments, then row layers' shards all-gathered over TP
    (one all-gather per such layer); under PP each stage returns its own layers.  Collective."""
    states = get_eva_layer_states(model, dataloader, peft_config, forward_fn, prepare_model_inputs_fn,
                                  prepare_layer_inputs_fn, adapter_name, gather_distributed_inputs,
                                  show_progress_bar)
    return peft_state_dict(states, model.groups)


@torch.no_grad()
def get_eva_layer_states(
    model: AdapterModel,
    dataloader: Iterable,
    peft_config: LoraConfig | None = None,
    forward_fn: ForwardFn | None = None,
    prepare_model_inputs_fn: Callable[[Any, LoraConfig], Any] | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Callable | Mapping[str, Callable] | None = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> EvaStateDict:
    """EVA components of this rank's target layers, {module name: EvaLayerState} (this rank's
    A shard, singular values, rank, adjusted alpha, convergence).  Collective: call on every rank.

    The arguments are PEFT's, with PEFT's meanings:
    peft_config: None: the adapter's config (else its eva_config and r drive this run).
    forward_fn(model, batch): None: megatron's forward for a Megatron model (forward-only
    schedule under PP), else PEFT's model(**batch) (model(*batch) / model(batch) for a tuple or a
    tensor); without PP this default stops a forward as soon as every unconverged layer's input
    is captured (nothing after it can change the result).
    prepare_model_inputs_fn(batch, config): the default is PEFT's token selection (attention
    mask, and labels with use_label_mask); None: no preparation (the batch itself).
    prepare_layer_inputs_fn(layer_inputs, model_input, name) -> [n, I_local], or a dict of them by
    module name (layers it does not name: None): the default keeps the selected tokens in each
    layer's own layout; None: every row of the input (PEFT's flatten).
    gather_distributed_inputs: True: data-parallel ranks pool their statistics (sketches, never
    activations); False: each DP replica computes from its own batches alone.
    show_progress_bar: on world rank 0, a bar on a terminal, else a line every
    `progress.LOG_EVERY` steps on stderr.
    """
    _check_model(model, adapter_name)
    config = peft_config or model.peft_config[adapter_name]
    eva = config.eva_config or EvaConfig()
    groups = model.groups if gather_distributed_inputs else replace(
        model.groups, dp_group=GROUP_OF_ONE, dp_size=1, dp_rank=0)
    run = _EvaRun(model, adapter_name, config, eva, groups, prepare_layer_inputs_fn)
    run.capture.stop_early = forward_fn is None and groups.pp_size == 1  # our forward: nothing after it
    batches = _cycle(dataloader, groups, next(model.parameters()).device)
    forward_fn = forward_fn or default_forward_fn(model)
    if prepare_model_inputs_fn is prepare_model_inputs_fn_language_modeling:
        prepare = lambda batch: TokenMask(token_mask(batch, eva))  # noqa: E731  (indices for custom layer fns)
    elif prepare_model_inputs_fn is None:
        prepare = lambda batch: batch  # noqa: E731
    else:
        prepare = lambda batch: prepare_model_inputs_fn(batch, config)  # noqa: E731
    training = model.training
    model.eval()
    try:
        with model.disable_adapter():
            return run.execute(batches, forward_fn, prepare, show_progress_bar)
    finally:
        run.capture.detach()
        model.train(training)


@torch.no_grad()
def initialize_eva_weights(
    model: AdapterModel,
    dataloader: Iterable | None = None,
    eva_state_dict: Mapping[str, EvaLayerState | torch.Tensor] | None = None,
    forward_fn: ForwardFn | None = None,
    prepare_model_inputs_fn: Callable[[Any, LoraConfig], Any] | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Callable | Mapping[str, Callable] | None = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> AdapterModel:
    """PEFT's initialize_lora_eva_weights: A = the EVA components (new rank r_l), B = 0, alpha as
    adjusted; drop rank-0 adapters; record the ranks and alphas in `model.peft_config[adapter_name]`
    (rank_pattern / alpha_pattern).

    Collective.  eva_state_dict: from get_eva_layer_states / persist.load_eva_state, or PEFT-style
    {name: full components [rank, I]} (get_eva_state_dict's, or PEFT's own; names with or without
    "base_model.model."); computed from `dataloader` (the other arguments as in
    get_eva_layer_states) when None.
    """
    _check_model(model, adapter_name)
    if model.peft_config[adapter_name].init_lora_weights != "eva":
        raise ValueError("initialize_eva_weights needs LoraConfig.init_lora_weights='eva'")
    if eva_state_dict is None:
        if dataloader is None:
            raise ValueError("initialize_eva_weights: pass a dataloader or an eva_state_dict")
        eva_state_dict = get_eva_layer_states(model, dataloader, None, forward_fn, prepare_model_inputs_fn,
                                              prepare_layer_inputs_fn, adapter_name, gather_distributed_inputs,
                                              show_progress_bar)
    load_into_model(model, eva_state_dict, adapter_name)
    return model


def default_forward_fn(model: AdapterModel) -> ForwardFn:
    """Megatron model (its adapted layers are column/row parallel): model(input_ids, None, None),
    under PP megatron's forward-only schedule; else PEFT's model(**batch) (`forward_batch`)."""
    modes = {layer.geometry.parallel_mode for _, layer in model.adapter_layers()}
    if not modes & {"column", "row"}:
        return forward_batch
    if model.groups.pp_size == 1:
        return lambda m, batch: m.model(batch["input_ids"], None, None)
    from parallel_adapters.mcore.schedule import pipeline_forward_backward

    def pipeline_forward(m: AdapterModel, batch: Mapping[str, torch.Tensor]) -> None:
        pipeline_forward_backward(m.model, [{"input_ids": batch["input_ids"]}], _no_loss, forward_only=True)

    return pipeline_forward


def forward_batch(model: torch.nn.Module, batch: Any) -> Any:
    """PEFT's forward_fn_dict, model(**batch), and for other batches model(*batch) / model(batch)."""
    if isinstance(batch, Mapping):
        return model(**batch)
    return model(*batch) if isinstance(batch, (tuple, list)) else model(batch)


def _no_loss(batch: Mapping, logits: torch.Tensor) -> tuple[torch.Tensor, dict]:
    return logits.new_zeros(()), {}


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------

class _EvaRun:
    """One EVA computation: hooks, per-layer statistics, the collective loop."""

    def __init__(self, model: AdapterModel, adapter_name: str, config: LoraConfig, eva: EvaConfig,
                 groups: ParallelGroups, prepare_layer_inputs_fn):
        self.model, self.config, self.eva, self.groups = model, config, eva, groups
        self.layers = {l.module_name: l for _, l in eva_layers(model, adapter_name)}
        self.r = {n: l.r[adapter_name] for n, l in self.layers.items()}
        self.alpha = {n: float(l.lora_alpha[adapter_name]) for n, l in self.layers.items()}
        self.step = 0
        self.world_of_one = C.group_size(None) == 1  # PEFT's signed convergence test (see D.process_step)
        gaussians = T.Gaussians(config.seed)  # one cache: layers of one shape share their test matrix
        tp_owners = _tp_owners(self.layers, groups.tp_size)
        self.stats = {n: D.layer_stats(n, l, groups, gaussians, tp_owners.get(n)) for n, l in self.layers.items()}
        self._provisional_caps()
        g = self.groups
        self.queue = D.StepQueue(g)
        fns = layer_inputs_fns(prepare_layer_inputs_fn, list(self.layers), strict=groups.pp_size == 1)
        self.capture = InputCapture(self.layers, self._sink, fns, g.tp_rank, g.tp_size)
        self.capture.elsewhere = {n for n, s in self.stats.items() if not (s.on_this_rank or s.seq_split)}

    def _provisional_caps(self) -> None:
        """Before the first forward the shared-input groups (whose largest cap the owner keeps) are
        unknown: keep as many components as any layer of this stage could need, shrink later."""
        for s in self.stats.values():
            cap = s.in_features
            if self.eva.rho <= A.RHO_THRESHOLD:  # above it PEFT's cap depends on every stage's shapes
                cap = min(cap, max(A.max_rank(r, self.eva.rho) for r in self.r.values()))
            s.configure(cap, min(math.ceil(self.eva.sketch_multiple * cap), s.in_features))

    def _sink(self, name: str, rows: torch.Tensor) -> None:
        self.queue.add(self.stats[name], rows)

    def execute(self, batches: Iterator, forward_fn: ForwardFn, prepare: Callable, show: bool) -> EvaStateDict:
        self.capture.attach()
        capped = False
        layout: _Layout | None = None
        flags: dict[str, torch.Tensor] = {}
        rank_dist: dict[str, int] = {}
        progress = Progress(self.eva.max_steps, show and C.group_rank(None) == 0)
        while True:
            if layout is not None:
                conv = {o: bool(flags[o][: rank_dist[o]].all()) for o in layout.owners}
                done = sum(conv[layout.shared.get(n, n)] for n in layout.names)
                progress.update(self.step, done, len(layout.names))
                if all(conv.values()):
                    break
                if self.step >= self.eva.max_steps:
                    capped = True
                    break
                self.capture.enabled = {o for o in self.stats if not conv[o]}
            else:
                self.capture.enabled, self.capture.probing = set(self.stats), True
            batch = next(batches)
            self.capture.model_input = prepare(batch)
            self.capture.start_forward()
            try:
                forward_fn(self.model, batch)
            except ForwardDone:
                pass
            self.queue.flush()
            if layout is None:
                layout = self._setup(self.capture.end_probe())
                rank_dist = dict(layout.caps)
            active = [self.stats[o] for o in self.stats if o in self.capture.enabled]
            D.process_step(active, self.groups, self.eva.tau, signed=self.world_of_one)
            ratios, flags, has_state = D.decide(self.stats, layout.owners, layout.caps, self.groups,
                                                self._device())
            if all(has_state.values()):
                rank_dist = A.allocate_ranks(ratios, {o: layout.caps[o] for o in layout.owners},
                                             layout.budget, layout.shared)
            self.step += 1
        progress.close(self.step, done, len(layout.names), capped)
        self.capture.detach()
        return self._finish(layout, rank_dist, flags, has_state, capped)

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _setup(self, local_shared: dict[str, str]) -> _Layout:
        """After the first forward: the global layer table (one metadata all-gather over PP)."""
        local = {"names": list(self.layers), "r": self.r, "alpha": self.alpha, "shared": local_shared,
                 "max_dim": _max_param_dim(self.model, self.groups),
                 "in": {n: l.geometry.in_features for n, l in self.layers.items()}}
        stages = [local] if self.groups.pp_size == 1 else C.all_gather_objects(local, self.groups.pp_group)
        names = [n for st in stages for n in st["names"]]
        r = {k: v for st in stages for k, v in st["r"].items()}
        shared = {k: v for st in stages for k, v in st["shared"].items()}
        rho = A.effective_rho(self.eva.rho, self.config.r, max(st["max_dim"] for st in stages))
        caps = A.group_max_ranks({n: A.max_rank(r[n], rho) for n in names}, shared)
        alpha = {k: v for st in stages for k, v in st["alpha"].items()}
        in_features = {k: v for st in stages for k, v in st["in"].items()}
        too_big = {n: (caps[n], in_features[n]) for n in names if caps[n] > in_features[n]}
        if too_big:  # every rank sees the same global table: all raise together
            raise ValueError(f"EVA: round(r*rho) exceeds the input features of {too_big} (cap, in_features); "
                             "lower EvaConfig.rho or r")
        for name in local_shared:
            del self.stats[name]
        for name, s in self.stats.items():
            s.configure(caps[name], min(math.ceil(self.eva.sketch_multiple * caps[name]), s.in_features))
        return _Layout(names, r, alpha, shared, caps, [n for n in names if n not in shared])

    def _finish(self, layout: _Layout, rank_dist, flags, has_state, capped: bool) -> EvaStateDict:
        missing = [o for o in layout.owners if not has_state[o]]
        if missing:
            raise ValueError(f"EVA: layers {missing} never saw enough tokens (>= round(r*rho) per step); "
                             "use longer or less masked batches")
        conv = {n: bool(flags[layout.shared.get(n, n)][: rank_dist[n]].all()) for n in layout.names}
        if capped:
            warnings.warn(f"EVA stopped at EvaConfig.max_steps={self.eva.max_steps} before these layers converged "
                          f"(tau={self.eva.tau}): {[n for n in layout.names if not conv[n]]}", stacklevel=3)
        comps, svs = self._final_components()
        out: EvaStateDict = {}
        for name, layer in self.layers.items():
            owner = layout.shared.get(name, name)
            k = rank_dist[name]
            sv = svs[owner][:k].clone()
            a = whiten(comps[owner], svs[owner].clamp_min(1e-300), k) if self.eva.whiten else comps[owner][:k]
            alpha = A.adjusted_alpha(self.alpha[name], self.r[name], k, self.eva.adjust_scaling_factors)
            out[name] = EvaLayerState(a.contiguous(), sv, k, float(alpha), layer.spec_a,
                                      layer.geometry.in_features, self.r[name], conv[name])
        T.sync_replicas_([t for s in out.values() for t in (s.components, s.singular_values)],
                         [rep for s in out.values() for rep in (s.spec.replicated, True)], self.groups)
        return out

    def _final_components(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Owner components with PEFT's sign convention and their singular values (sharded: one TP
        all-gather for the signs; inputs decomposed by one TP rank: one all-reduce shares them)."""
        comps, g = {}, self.groups
        for sharded in (False, True):
            stats = [s for s in self.stats.values() if s.sharded == sharded and s.on_this_rank]
            group, size = (g.tp_group, g.tp_size) if sharded else (None, 1)
            fixed = T.sign_fix_sharded([s.state.components for s in stats], [s.global_index for s in stats], group, size)
            comps.update({s.name: c for s, c in zip(stats, fixed)})
        svs = {n: s.state.singular_values for n, s in self.stats.items() if s.on_this_rank}
        lent = [s for s in self.stats.values() if s.tp_owner is not None]
        values = [v for s in lent for v in (comps.get(s.name), svs.get(s.name))]
        shapes = [shape for s in lent for shape in ((s.cap, s.in_features), (s.cap,))]
        device = lent[0].device if lent else None
        shared = iter(T.share_from_owners(values, shapes, g.tp_group, g.tp_size, device))
        for s in lent:
            comps[s.name], svs[s.name] = next(shared), next(shared)
        return comps, svs


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------

def _check_model(model: Any, adapter_name: str) -> None:
    if not isinstance(model, AdapterModel):
        raise ValueError(f"EVA needs an AdapterModel (get_adapter_model(...)), got {type(model).__name__}")
    if adapter_name not in model.peft_config:
        raise ValueError(f"unknown adapter {adapter_name!r}; have {sorted(model.peft_config)}")


def _tp_owners(layers: Mapping[str, Any], tp_size: int) -> dict[str, int]:
    """Column-parallel inputs are whole on every TP rank (replicated, or split by tokens under
    sequence parallelism): one TP rank holds each such layer's state, balanced by input width."""
    column = [n for n, l in layers.items() if l.geometry.parallel_mode == "column"]
    if tp_size == 1 or not column:
        return {}
    return dict(zip(column, D.assign_tp_owners([layers[n].geometry.in_features for n in column], tp_size)))


def _cycle(dataloader: Iterable, groups: ParallelGroups, device: torch.device) -> Iterator:
    """PEFT's itertools.cycle, after a collective check that no rank's loader is empty."""
    it = iter(dataloader)
    first = next(it, None)
    empty = D.agree_max_(torch.tensor([float(first is None)], dtype=torch.float64, device=device), groups)
    if float(empty[0]) > 0:
        raise ValueError("EVA: the dataloader is empty on at least one rank")
    return itertools.cycle(itertools.chain([first], it))


def _max_param_dim(model: AdapterModel, groups: ParallelGroups) -> int:
    """Largest global parameter dimension (PEFT's limit for rho > 1000)."""
    best = 0
    for p in model.model.parameters():
        shape = list(p.shape)
        if getattr(p, "tensor_model_parallel", False):
            shape[int(p.partition_dim)] *= groups.tp_size
        best = max([best, *shape])
    return best
