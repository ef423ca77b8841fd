"""Hosts for lookup tables and convolutions: Megatron's VocabParallelEmbedding, a plain
nn.Embedding, a plain nn.Conv2d.

Legend: T tokens, V vocabulary (padded as Megatron pads it), H width, t = TP size.

    host        slots               the ONE collective (forward / backward)
    vocab       partial_addend,     all-reduce of the partial lookup (SP: reduce-scatter along the
                reduction_payload,  sequence) / identity (SP: all-gather), as the base alone; a
                output_scale        kind's payload rides inside it (hosts/payload.py)
    embedding   local_addend,       none
                output_scale
    conv2d      local_addend,       none
                input_scale,
                output_scale,
                weight_delta

VocabParallelEmbedding, rank i holds rows [i V/t, (i+1) V/t) of the table.  A token outside them
looks up row 0 and its row of the partial output is zeroed, so the sum over ranks is the one
real row.  An adapter's addend is added to the partial BEFORE that zeroing and before the
reduction: it rides inside the base's collective, and the zeroing also stops the gradient of
the rows a rank does not own.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from parallel_adapters.adapters.hosts import payload
from parallel_adapters.adapters.hosts.base import AdapterHost
from parallel_adapters.adapters.hosts.linear import delta_weight
from parallel_adapters.adapters.kinds.protocol import (
    INPUT_SCALE, LOCAL_ADDEND, OUTPUT_SCALE, PARTIAL_ADDEND, REDUCTION_PAYLOAD, WEIGHT_DELTA,
)
from parallel_adapters.distributed import collectives


class VocabParallelEmbeddingHost(AdapterHost):
    """Adapters on Megatron's VocabParallelEmbedding (LoRA: A_i [r, V/t] split like the table's
    rows, B [H, r] replicated, its gradient partial -> finalize_grads).

    forward: ids -> local ids (masked) -> p_i = partial_addend(lookup(W_i)) -> zero the rows of
             tokens this rank does not own -> ONE all-reduce ([b, s, H]) or, under SP, ONE
             reduce-scatter of the [s, b, H] transpose, exactly as VocabParallelEmbedding.
    """

    SLOTS = frozenset({PARTIAL_ADDEND, REDUCTION_PAYLOAD, OUTPUT_SCALE})

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        local, outside = ids, None
        if g.tp_size > 1:
            start = self._base.vocab_start_index
            outside = (ids < start) | (ids >= self._base.vocab_end_index)
            local = (ids - start).masked_fill(outside, 0)
        partial = F.embedding(local, self.weight)
        views = self._running_views()
        partial, payloads = payload.partial_with_payloads(views, local, partial)
        if outside is not None:
            partial = partial.masked_fill(outside.unsqueeze(-1), 0.0)
        if g.sequence_parallel:
            partial = partial.transpose(0, 1).contiguous()  # [b, s, H] -> [s, b, H], as Megatron
        if any(p is not None for p in payloads):
            y, reduced = payload.reduce_with_payloads(partial, payloads, self._reduce,
                                                      g.tp_size if g.sequence_parallel else None)
        else:
            y, reduced = self._reduce(partial), payloads
        for view, red in zip(views, reduced):
            if OUTPUT_SCALE in view.slots:
                y = view.kind.output_scale(view, local, y, red)
        return y

    def _reduce(self, partial: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        if g.sequence_parallel:
            return collectives.reduce_scatter_sequence(partial, g.tp_group)
        return collectives.reduce_from_group(partial, g.tp_group)


class EmbeddingHost(AdapterHost):
    """Adapters on a plain nn.Embedding: y = local_addend(lookup(W)).  Not tensor-parallel."""

    SLOTS = frozenset({LOCAL_ADDEND, OUTPUT_SCALE})

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = F.embedding(ids, self.weight, self.geometry.padding_idx)
        for view in self._running_views():  # as the linear hosts: each adapter's addend, then its scale
            y = view.kind.local_addend(view, ids, y, None)
            if OUTPUT_SCALE in view.slots:
                y = view.kind.output_scale(view, ids, y, None)
        return y


class Conv2dHost(AdapterHost):
    """Adapters on a plain nn.Conv2d, as the replicated linear host: every input_scale on x, the
    conv with W + every weight_delta, per adapter local_addend then output_scale, the bias last
    (inside the conv when no adapter scales the output).  Not tensor-parallel."""

    SLOTS = frozenset({LOCAL_ADDEND, INPUT_SCALE, OUTPUT_SCALE, WEIGHT_DELTA})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        views = self._running_views()
        for view in views:
            if INPUT_SCALE in view.slots:
                x = view.kind.input_scale(view, x)
        scaled = any(OUTPUT_SCALE in view.slots for view in views)
        y = self._base._conv_forward(x, delta_weight(self.weight, views), None if scaled else self.bias)
        for view in views:
            if LOCAL_ADDEND in view.slots:
                y = view.kind.local_addend(view, x, y, None)
            if OUTPUT_SCALE in view.slots:
                y = view.kind.output_scale(view, x, y, None)
        return y + self.bias.reshape(-1, 1, 1) if (scaled and self.bias is not None) else y
