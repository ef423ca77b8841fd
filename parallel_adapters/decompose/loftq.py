"""LoftQ factors (PEFT's `loftq_init`) of a tensor-parallel weight, from this rank's shard only.

PEFT, on the whole W [O, I] in float32, n = loftq_iter:

    L R = 0
    repeat n times:  Q = dequant(quant(W - L R))          blockwise (decompose/quantize.py)
                     L R = top-r SVD of W - Q: L = U_r sqrt(S_r), R = sqrt(S_r) Vh_r
    A = R, B = L, the frozen W replaced by Q

The scaling s is NOT divided out (unlike PiSSA): the layer starts at Q + s B A, which is W's
LoftQ approximation for s = 1 (lora_alpha = r) only, exactly as PEFT.  Here, per host: the
quantisation is local (each rank its shard's blocks, `quantize.check_block_layout`), L R's shard
is local (B_i A or B A_i), and the SVD of the split W - Q is `pissa.pissa_factors` with s = 1
(`svd.split_svd`'s converging mode: sketches only on the wire, never a block of W or of W - Q;
signs: the largest entry of each row of A positive, so every TP size gives one adapter).

Rebuilding Q later (resume, merge) needs only W and the factors subtracted before the LAST
quantisation (zero for n = 1): `quantized_base` is the one rule, used by the loop itself, so a
rebuild with the same shards is bit-identical.  Precision: float32 for float32 / float16 /
bfloat16 weights (as PEFT), float64 for float64 ones.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from parallel_adapters.decompose import pissa, quantize


@dataclass(frozen=True)
class LoftQ:
    """This rank's shards, in the working dtype: the factors `a`, `b`, the de-quantised base `q`,
    and `a_prev`, `b_prev` (the factors whose product was subtracted before the last quantisation)."""

    a: torch.Tensor
    b: torch.Tensor
    q: torch.Tensor
    a_prev: torch.Tensor
    b_prev: torch.Tensor
    converged: bool
    iterations: int
    """Subspace iterations of the loftq_iter SVDs together (each also has its first sketch)."""


def quantized_base(w_local: torch.Tensor, a_prev: torch.Tensor, b_prev: torch.Tensor, bits: int,
                   block_size: int = quantize.BLOCK_SIZE) -> torch.Tensor:
    """dequant(quant(W_i - (B_prev A_prev)_i)) in the working dtype (this rank's shard; local)."""
    w = w_local.to(pissa.working_dtype(w_local.dtype))
    return quantize.fake_quantize(w - b_prev.to(w.dtype) @ a_prev.to(w.dtype), bits, block_size)


def loftq_factors(w_local: torch.Tensor, mode: str, r: int, bits: int, iters: int, generator: torch.Generator,
                  in_index: torch.Tensor, group, block_size: int = quantize.BLOCK_SIZE) -> LoftQ:
    """PEFT's alternating loop on this rank's shard (module docstring).  `mode`, `in_index`,
    `group`, `generator` as `pissa.pissa_factors`; the caller has checked the block layout."""
    if iters < 1:
        raise ValueError(f"loftq_iter must be at least 1, got {iters}")
    w = w_local.to(pissa.working_dtype(w_local.dtype))
    a_prev = w.new_zeros(r, w.shape[1])  # column: A replicated [r, I]; row: A_i [r, I/t]
    b_prev = w.new_zeros(w.shape[0], r)
    converged, total = True, 0
    for i in range(iters):
        q = quantized_base(w, a_prev, b_prev, bits, block_size)
        a, b, report = pissa.pissa_factors(w - q, mode, r, 1.0, None, generator, in_index, group)
        converged, total = converged and report.converged, total + report.iterations
        if i + 1 < iters:
            a_prev, b_prev = a, b
    return LoftQ(a, b, q, a_prev, b_prev, converged, total)
