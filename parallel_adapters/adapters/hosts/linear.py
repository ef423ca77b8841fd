"""Hosts for Megatron's column- and row-parallel linear layers and for plain nn.Linear.

Legend: T tokens (any leading dims, Megatron's [S, B]), I in, O out, t = TP size.

The hosts compute the frozen base matmul themselves (F.linear on the base's own weight and bias)
instead of calling the base layer's forward, so that every adapter rides inside the base's single
collective.  No collective is added per micro-batch; a TP-replicated adapter tensor's gradient is
a per-rank partial that `finalize_grads` sums once per optimizer step.  Slots (kinds/protocol.py)
implemented here; the others raise NotImplementedError when a kind asks for them:

    host        slots                          the ONE collective (forward / backward)
    column      input_columns, local_addend,   copy_to (identity / all-reduce of dx), or under SP
                output_scale, input_scale,     all-gather of [x | columns] / reduce-scatter
                weight_delta
    row         partial_addend,                all-reduce of the partial (SP: reduce-scatter) /
                reduction_payload,             identity (SP: all-gather); the payload rides
                output_scale, input_scale,     inside it (hosts/payload.py)
                weight_delta
    replicated  local_addend, output_scale,    none
                input_scale, weight_delta
    MoE expert  as column / row (no payload    none of its own: Megatron's token dispatcher
    (column or  rows at expert-TP > 1)         all-gathers the input and reduce-scatters the
    row)                                       output over expert-TP x EP (geometry.expert)

Before the base matmul: every input_scale on the input this rank multiplies (column: the whole
input, after the all-gather / copy_to; row: x_i), and the matmul runs on W_i + the weight_deltas.
Per adapter, in order: local_addend, then output_scale (PEFT applies an adapter's scale to the
output accumulated so far); the bias is added after every output_scale.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from parallel_adapters.adapters.hosts import payload
from parallel_adapters.adapters.hosts.base import AdapterHost
from parallel_adapters.adapters.hosts.dropout import rank_dropped
from parallel_adapters.adapters.kinds.protocol import (
    INPUT_COLUMNS, INPUT_SCALE, LOCAL_ADDEND, OUTPUT_SCALE, PARTIAL_ADDEND, REDUCTION_PAYLOAD, WEIGHT_DELTA,
    AdapterView, ReductionPayload,
)
from parallel_adapters.distributed import collectives


class _MegatronStateMixin:
    """Megatron's linear layers carry `_extra_state` in their state dict; keep that key."""

    def get_extra_state(self):
        return self._base.get_extra_state()

    def set_extra_state(self, state) -> None:
        self._base.set_extra_state(state)


class ColumnParallelHost(_MegatronStateMixin, AdapterHost):
    """Adapters on a column-parallel base (LoRA: A [r, I] replicated, B_i [O/t, r], z = drop(x) A^T).

    Shards (rank i of t):  W_i [O/t, I] (frozen); adapter tensors as their kind declares.
    forward, SP off:  x -> copy_to (identity) -> columns c = input_columns(x) ->
                      y_i = local_addend(x W_i^T (+ b_i), c)
    backward, SP off: the copy_to all-reduce of dx carries base + adapters (ONE all-reduce, as the
                      base alone); replicated adapter tensors' gradients are partial ->
                      summed in finalize_grads.
    forward, SP on:   [x_local | c_local] (the input columns of every adapter) -> ONE all-gather
                      along the sequence -> y_i = local_addend(x W_i^T, c)
    backward, SP on:  [dx | dc] -> ONE reduce-scatter.
    gather_output:    the base's all-gather of y (adapters already inside y).
    Returns (output, bias) where bias is not None only with skip_bias_add.
    """

    SLOTS = frozenset({INPUT_COLUMNS, LOCAL_ADDEND, OUTPUT_SCALE, INPUT_SCALE, WEIGHT_DELTA})

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None,
                runtime_gather_output: bool | None = None):
        g = self.geometry
        weight = self.weight if weight is None else weight
        views = self._running_views(weight)
        if g.sequence_parallel:
            x, columns = self._gather_with_input_columns(x, views)
        else:
            if not g.expert:  # an expert's dx is summed by the dispatcher's reduce-scatter
                x = collectives.copy_to_group(x, g.tp_group)
            columns = [_input_columns(view, x) for view in views]
        x = _scaled_input(x, views)  # the whole input: a replicated scale, no collective
        y = _local_output(x, weight, None if g.skip_bias_add else self.bias, views, columns)
        gather = g.gather_output if runtime_gather_output is None else runtime_gather_output
        if gather:
            y = collectives.gather_last_dim(y, g.tp_group)
        return y, (self.bias if g.skip_bias_add else None)

    def _gather_with_input_columns(self, x_local: torch.Tensor, views: list[AdapterView]):
        """All-gather [x | c_1 | c_2 ...] along the sequence in one collective; split it again.
        Returns (x, one entry per view: its gathered columns, or None)."""
        columns_local = [_input_columns(view, x_local) for view in views]
        present = [c for c in columns_local if c is not None]
        if not present:
            return collectives.gather_sequence(x_local, self.geometry.tp_group), columns_local
        widths = [x_local.shape[-1]] + [c.shape[-1] for c in present]
        full = collectives.gather_sequence(torch.cat([x_local, *present], dim=-1), self.geometry.tp_group)
        x_full, *gathered = full.split(widths, dim=-1)
        gathered_iter = iter(gathered)
        return x_full, [None if c is None else next(gathered_iter) for c in columns_local]


class RowParallelHost(_MegatronStateMixin, AdapterHost):
    """Adapters on a row-parallel base (LoRA: A_i [r, I/t], B [O, r] replicated).

    Shards (rank i of t):  W_i [O, I/t] (frozen); adapter tensors as their kind declares.
    forward:   p_i = partial_addend(x_i W_i^T)  -> ONE all-reduce (SP off) or ONE reduce-scatter
               along the sequence (SP on), as the base alone; bias after it.
    backward:  dy arrives complete (all-reduce backward is identity; reduce-scatter backward is
               the base's all-gather); dx_i and the split adapter tensors' gradients complete;
               replicated ones partial -> finalize_grads.
    input_is_parallel=False: x is split here (backward: all-gather of dx), as Megatron does.
    """

    SLOTS = frozenset({PARTIAL_ADDEND, REDUCTION_PAYLOAD, OUTPUT_SCALE, INPUT_SCALE, WEIGHT_DELTA})

    def forward(self, x: torch.Tensor):
        g = self.geometry
        if not g.input_is_parallel:
            x = collectives.scatter_last_dim(x, g.tp_group)
        views = self._running_views()
        x = _scaled_input(x, views)  # x_i: a scale split like W's columns
        partial = F.linear(x, delta_weight(self.weight, views))
        partial, payloads = payload.partial_with_payloads(views, x, partial)
        if any(p is not None for p in payloads):
            y, reduced = self._reduce_with_payloads(partial, payloads)
        else:
            y, reduced = self._reduce(partial), payloads
        for view, red in zip(views, reduced):
            if OUTPUT_SCALE in view.slots:
                y = view.kind.output_scale(view, x, y, red)
        if g.skip_bias_add:
            return y, self.bias
        return (y + self.bias if self.bias is not None else y), None

    def add_adapter(self, name, kind, settings, full_tensors, dp_rank: int = 0, pp_rank: int = 0) -> None:
        g = self.geometry
        if g.expert and g.tp_size > 1 and REDUCTION_PAYLOAD in kind.slots(g.parallel_mode):
            raise NotImplementedError(
                f"{self.module_name}: adapter kind {kind.name!r} needs rows summed over expert-tensor-parallel "
                f"ranks ({REDUCTION_PAYLOAD}), but an expert layer's output is reduced by Megatron's token "
                "dispatcher, where nothing can ride; use expert_tensor_parallel=1 or another kind")
        super().add_adapter(name, kind, settings, full_tensors, dp_rank, pp_rank)

    def _reduce(self, partial: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        if g.expert:  # the dispatcher's reduce-scatter sums the partials (over expert-TP x EP)
            return partial
        if g.sequence_parallel:
            return collectives.reduce_scatter_sequence(partial, g.tp_group)
        return collectives.reduce_from_group(partial, g.tp_group)

    def _reduce_with_payloads(self, partial: torch.Tensor, payloads: list[ReductionPayload | None]):
        """The ONE reduction carrying the kinds' payloads too; (y, per view: reduced payload or None)."""
        g = self.geometry
        return payload.reduce_with_payloads(partial, payloads, self._reduce, g.tp_size if g.sequence_parallel else None)


class ReplicatedHost(AdapterHost):
    """Adapters on a plain nn.Linear (not tensor-parallel): y = local_addend(x W^T + b).

    Returns a tensor, like the nn.Linear it wraps.
    """

    SLOTS = frozenset({LOCAL_ADDEND, OUTPUT_SCALE, INPUT_SCALE, WEIGHT_DELTA})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        views = self._running_views()
        x = _scaled_input(x, views)
        return _local_output(x, self.weight, self.bias, views, [None] * len(views))


HOST_FOR_MODE = {"column": ColumnParallelHost, "row": RowParallelHost, "replicated": ReplicatedHost}
"""Linear hosts by parallel mode; `adapters.inject.host_class` adds the lookup and conv hosts."""


def _local_output(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, views: list[AdapterView],
                  columns: list[torch.Tensor | None]) -> torch.Tensor:
    """x W^T, each adapter's local_addend then output_scale, + bias (inside F.linear when no
    adapter scales the output)."""
    scaled = any(OUTPUT_SCALE in view.slots for view in views)
    y = F.linear(x, delta_weight(weight, views), None if scaled else bias)
    for view, cols in zip(views, columns):
        if LOCAL_ADDEND in view.slots:
            y = view.kind.local_addend(view, x, y, cols)
        if OUTPUT_SCALE in view.slots:
            y = view.kind.output_scale(view, x, y, None)
    return y + bias if (scaled and bias is not None) else y


def _input_columns(view: AdapterView, x: torch.Tensor) -> torch.Tensor | None:
    return view.kind.input_columns(view, x) if INPUT_COLUMNS in view.slots else None


def _scaled_input(x: torch.Tensor, views: list[AdapterView]) -> torch.Tensor:
    for view in views:
        if INPUT_SCALE in view.slots:
            x = view.kind.input_scale(view, x)
    return x


def delta_weight(weight: torch.Tensor, views: list[AdapterView]) -> torch.Tensor:
    """W_i + every weight_delta (in the deltas' dtype when wider, cast back to W's for the matmul),
    each times this rank's rows of its rank-dropout mask in training."""
    deltas = [rank_dropped(view.kind.weight_delta(view), view.rank_mask, view.geometry)
              for view in views if WEIGHT_DELTA in view.slots]
    if not deltas:
        return weight
    return (weight.to(deltas[0].dtype) + sum(deltas)).to(weight.dtype)
