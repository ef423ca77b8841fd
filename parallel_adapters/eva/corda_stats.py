"""CorDA's input covariance per target layer (PEFT's `calib_cov_distribution`), sharded where the
layer input is, from the rows EVA's hooks capture (eva/hooks.py).

PEFT, per forward call (one calibration sequence): X = the layer input [n, I], X /= |max(X)|,
C += X^T X, count += 1; at the end C /= count.  Here one call is one sequence too, so the result
is the same whatever the micro-batch or data-parallel split.  Per host:

    host                    rows seen             C held                per call on the wire
    column, replicated      all tokens [n, I]     whole [I, I]          nothing
    column, SP              token chunk [n_i, I]  partial sum of C      one element (MAX of the max)
    row                     feature shard [n,I/t] rows C_i [I/t, I]     all-gather of the rows [n, I]

Row host: C_i = X_i^T X needs every feature of the tokens, so the call's rows are all-gathered
once (the input, never a block of W); columns in rank-major order (`decompose/corda.py`).  At the
end, ONE coalesced all-reduce over DP (sums and counts of every layer) and, for SP hosts, one over
TP (the partial sums).  Pure torch plus `distributed.collectives`.
"""
from __future__ import annotations

import math

import torch

from parallel_adapters.distributed import collectives


def accumulation_dtype(input_dtype: torch.dtype, use_float16: bool) -> torch.dtype:
    """PEFT: the input's own dtype with use_float16_for_covariance, else float32 (float64 kept)."""
    return input_dtype if use_float16 else torch.promote_types(input_dtype, torch.float32)


class LayerCovariance:
    """One layer's running sum; `add` per call, `finish` (collective over all layers) at the end."""

    def __init__(self, name: str, mode: str, sequence_parallel: bool, tp_group, use_float16: bool):
        self.name, self.mode, self.tp_group, self.use_float16 = name, mode, tp_group, use_float16
        self.seq_split = mode == "column" and sequence_parallel and collectives.group_size(tp_group) > 1
        self.row = mode == "row" and collectives.group_size(tp_group) > 1
        self.sum: torch.Tensor | None = None
        self.count = 0

    def add(self, rows: torch.Tensor) -> None:
        """One call's rows [n, I_local] (collective over TP for row and SP hosts)."""
        x = rows.to(accumulation_dtype(rows.dtype, self.use_float16))
        full = torch.cat(collectives.all_gather_tensor(x.T.contiguous(), self.tp_group)).T if self.row else x
        top = full.max() if full.numel() else torch.tensor(-math.inf, dtype=x.dtype, device=x.device)
        if self.seq_split:
            top = collectives.all_reduce_max_(top.reshape(1).to(torch.float64), self.tp_group)[0].to(x.dtype)
        if top.item() == -math.inf:  # no kept token in this call on any rank
            return
        scale = top.abs()
        x, full = x / scale, full / scale
        if torch.isnan(full).any() or torch.isinf(full).any():
            raise ValueError(f"CorDA layer {self.name}: invalid value in the input (nan or inf; an input "
                             "whose max is 0 divides by zero): check the calibration data")
        cov = x.T @ full
        if torch.isnan(cov).any() or torch.isinf(cov).any():
            raise ValueError(f"CorDA layer {self.name}: invalid value in the covariance (overflow; "
                             "use_float16_for_covariance=False accumulates in float32)")
        self.sum = cov if self.sum is None else self.sum + cov
        self.count += 1


def finish(layers: list[LayerCovariance], width: dict[str, tuple[int, int]], dtype: torch.dtype,
           device: torch.device, dp_group, tp_group) -> dict[str, torch.Tensor]:
    """{name: C (local part)} = the summed sums over DP (and TP for SP hosts) / the global count.
    `width`: each layer's (local rows, columns) of C, for a layer that saw no call on this rank.
    Collective over `dp_group` and `tp_group` (every rank passes the same layers in order)."""
    # float64: one coalesced reduction with the counts; the result in `dtype` (the accumulation's)
    sums = [(l.sum if l.sum is not None else torch.zeros(width[l.name], device=device)).to(torch.float64)
            for l in layers]
    counts = torch.tensor([float(l.count) for l in layers], dtype=torch.float64, device=device)
    split = [s for s, l in zip(sums, layers) if l.seq_split]
    if split:
        collectives.all_reduce_coalesced_(split, tp_group)
    collectives.all_reduce_coalesced_([*sums, counts], dp_group)
    out = {}
    for layer, total, count in zip(layers, sums, counts.tolist()):
        if count == 0:
            raise ValueError(f"CorDA layer {layer.name}: no calibration token reached it (every token masked, "
                             "or no batch): pass calibration data")
        out[layer.name] = (total / count).to(dtype)
    return out
