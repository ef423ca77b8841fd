"""Packing the `reduction_payload` slot into a row host's ONE reduction (docs/design.md section 4b).

The partial output [S, ..., O] and each kind's extra columns [S, ..., c] are concatenated along
the last dim; the kinds' small rows are flattened into one vector of P numbers.  Without
sequence parallelism the reduction is an all-reduce of [partial | columns | rows] flattened;
under SP it is a reduce-scatter along the sequence, so the rows are appended once per
destination rank ([t, S/t * ... | P] flattened) and every rank receives their sum.  Pure
functions: `pack` before the collective, `unpack` after it; the collective is the host's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from parallel_adapters.adapters.kinds.protocol import PARTIAL_ADDEND, REDUCTION_PAYLOAD, AdapterView, ReductionPayload


@dataclass(frozen=True)
class Layout:
    """Where each piece sits in the packed tensor."""

    shape: tuple[int, ...]
    """The reduced [partial | columns] shape (SP: the sequence dim already divided by t)."""
    widths: tuple[int, ...]
    """Last-dim widths: the partial's, then each kind's columns (0 where it has none)."""
    row_shapes: tuple[tuple[int, ...] | None, ...]
    """Each kind's rows' shape (None where it has none)."""


def pack(partial: torch.Tensor, columns: list[torch.Tensor | None], rows: list[torch.Tensor | None],
         scatter_ranks: int | None) -> tuple[torch.Tensor, Layout]:
    """One flat tensor to reduce.  `scatter_ranks`: t for a reduce-scatter along dim 0 (SP), None
    for an all-reduce.  Rows are detached (they carry no gradient)."""
    present = [c for c in columns if c is not None]
    wide = torch.cat([partial, *(c.to(partial.dtype) for c in present)], dim=-1) if present else partial
    widths = (partial.shape[-1], *(0 if c is None else c.shape[-1] for c in columns))
    flat_rows = [r.detach().reshape(-1).to(partial.dtype) for r in rows if r is not None]
    vector = torch.cat(flat_rows) if flat_rows else wide.new_zeros(0)
    row_shapes = tuple(None if r is None else tuple(r.shape) for r in rows)
    shape = tuple(wide.shape)
    if scatter_ranks is None:
        return torch.cat([wide.reshape(-1), vector]), Layout(shape, widths, row_shapes)
    if shape[0] % scatter_ranks:
        raise ValueError(f"reduce-scatter: sequence length {shape[0]} does not divide over {scatter_ranks} ranks")
    per_rank = wide.reshape(scatter_ranks, -1)
    packed = torch.cat([per_rank, vector.unsqueeze(0).expand(scatter_ranks, -1)], dim=1).reshape(-1)
    return packed, Layout((shape[0] // scatter_ranks, *shape[1:]), widths, row_shapes)


def unpack(reduced: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, list[torch.Tensor | None],
                                                             list[torch.Tensor | None]]:
    """(y [..., O], each kind's reduced columns or None, each kind's summed rows or None)."""
    size = 1
    for d in layout.shape:
        size *= d
    wide = reduced[:size].view(layout.shape)
    pieces = list(wide.split(list(layout.widths), dim=-1)) if len(layout.widths) > 1 else [wide]
    y, columns = pieces[0], [p if w else None for p, w in zip(pieces[1:], layout.widths[1:])]
    rows, offset = [], size
    for shape in layout.row_shapes:
        if shape is None:
            rows.append(None)
            continue
        count = 1
        for d in shape:
            count *= d
        rows.append(reduced[offset:offset + count].detach().view(shape))
        offset += count
    return y, columns, rows


def reduce_with_payloads(partial: torch.Tensor, payloads: list[ReductionPayload | None],
                         reduce: Callable[[torch.Tensor], torch.Tensor], scatter_ranks: int | None,
                         ) -> tuple[torch.Tensor, list[ReductionPayload | None]]:
    """The host's ONE reduction (`reduce`) carrying the kinds' payloads too: (y, per kind the
    reduced payload, or None where it sent none)."""
    flat, layout = pack(partial, [p and p.columns for p in payloads], [p and p.rows for p in payloads],
                        scatter_ranks)
    y, columns, rows = unpack(reduce(flat), layout)
    return y, [None if p is None else ReductionPayload(None, c, r) for p, c, r in zip(payloads, columns, rows)]


def partial_with_payloads(views: list[AdapterView], x: torch.Tensor, partial: torch.Tensor
                          ) -> tuple[torch.Tensor, list[ReductionPayload | None]]:
    """Each running adapter's `partial_addend` and `reduction_payload`, in order, on a host whose ONE
    collective reduces `partial`: (the partial to reduce, per view its payload or None)."""
    payloads: list[ReductionPayload | None] = []
    for view in views:
        if PARTIAL_ADDEND in view.slots:
            partial = view.kind.partial_addend(view, x, partial, None)
        payloads.append(view.kind.reduction_payload(view, x, partial) if REDUCTION_PAYLOAD in view.slots else None)
        if payloads[-1] is not None:
            partial = payloads[-1].partial
    return partial, payloads
