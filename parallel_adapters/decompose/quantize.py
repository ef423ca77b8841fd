"""LoftQ's blockwise quantiser (PEFT's bitsandbytes-free `NFQuantizer`), pure and local.

PEFT's layout: the weight [M, N] is flattened row-major and cut into blocks of `block_size`
consecutive elements (M N must be a multiple of it); each block keeps one scale and one code per
element, the index of the nearest table value to x / scale (ties: the lower index, as argmin).

    method    table (2**bits values in [-1, 1], sorted)                    scale of a block
    normal    NormalFloat: normal quantiles, asymmetric (one more          max |x|
              positive value), offset 0.9677083; bits=4 is bitsandbytes'
              NF4 table
    uniform   linspace(-1, 1, 2**bits)                                     mean + 2.5 std (unbiased)

De-quantised weight: table[code] * scale, in the working dtype.  PEFT computes in float32; a
float64 weight is quantised in float64 here (the table is PEFT's float32 one, widened).

Per TP shard: each rank quantises its own shard; the blocks are PEFT's global ones exactly when
no block straddles a shard (`check_block_layout`, refused otherwise before any work), so every
TP size gives one de-quantised weight, bit for bit.
"""
from __future__ import annotations

import torch

NF_OFFSET = 0.9677083
"""PEFT's (and bitsandbytes') NormalFloat offset: the outermost quantile used."""
BLOCK_SIZE = 64
"""PEFT's block size (`NFQuantizer(block_size=64)`; bitsandbytes' NF4 default too)."""
METHODS = ("normal", "uniform")


def normal_table(bits: int) -> torch.Tensor:
    """The 2**bits NormalFloat values (float32, sorted, max 1): 2**(bits-1) negative quantiles,
    zero, 2**(bits-1) - 1 positive ones, each side from `NF_OFFSET` towards the median."""
    _check_bits(bits)
    half = 2 ** (bits - 1)
    negative = torch.special.ndtri(torch.linspace(NF_OFFSET, 0.5, half + 1)[:-1].double())
    positive = -torch.special.ndtri(torch.linspace(NF_OFFSET, 0.5, half)[:-1].double())
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).float().sort().values
    return values / values.max()


def uniform_table(bits: int) -> torch.Tensor:
    """2**bits evenly spaced values in [-1, 1] (float32)."""
    _check_bits(bits)
    return torch.linspace(-1, 1, 2 ** bits)


def table(bits: int, method: str = "normal") -> torch.Tensor:
    if method not in METHODS:
        raise ValueError(f"quantisation method must be one of {METHODS}, got {method!r}")
    return normal_table(bits) if method == "normal" else uniform_table(bits)


def quantize(w: torch.Tensor, bits: int, block_size: int = BLOCK_SIZE, method: str = "normal"
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [n_blocks, block_size] uint8, scales [n_blocks, 1] in w's dtype) of w's row-major blocks."""
    if w.numel() % block_size:
        raise ValueError(f"a weight of shape {tuple(w.shape)} ({w.numel()} elements) does not split into "
                         f"blocks of {block_size}")
    blocks = w.reshape(-1, block_size)
    if method == "uniform":
        scales = blocks.mean(dim=-1, keepdim=True) + 2.5 * blocks.std(dim=-1, keepdim=True)
    else:
        scales = blocks.abs().amax(dim=-1, keepdim=True)
    values = table(bits, method).to(w.device, w.dtype)
    x = blocks / scales
    # nearest of the two neighbours, compared as argmin over the table compares (ties: lower)
    hi = torch.searchsorted(values, x.contiguous()).clamp(max=values.numel() - 1)
    lo = (hi - 1).clamp(min=0)
    codes = torch.where((x - values[hi]).abs() < (x - values[lo]).abs(), hi, lo)
    return codes.to(torch.uint8), scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor, bits: int, shape, method: str = "normal") -> torch.Tensor:
    """table[codes] * scales reshaped to `shape`, in the scales' dtype."""
    values = table(bits, method).to(scales.device, scales.dtype)
    return (values[codes.long()] * scales).reshape(shape)


def fake_quantize(w: torch.Tensor, bits: int, block_size: int = BLOCK_SIZE, method: str = "normal") -> torch.Tensor:
    """The de-quantised weight: dequantize(quantize(w)) (PEFT's `quantize_block` then `dequantize_block`)."""
    codes, scales = quantize(w, bits, block_size, method)
    return dequantize(codes, scales, bits, w.shape, method)


def check_block_layout(module: str, mode: str, out_features: int, in_features: int, tp_size: int, chunks: int,
                       block_size: int = BLOCK_SIZE) -> None:
    """ValueError (naming the module, its shape, the block size and the TP size) unless every one of
    PEFT's row-major blocks of the global W [O, I] lies in one TP shard and keeps its elements in
    the shard's own row-major order.  TP=1 (or a replicated host): PEFT's rule, O I a multiple of the block.  Column host
    (rows split, `chunks` logical blocks each split): (O / (chunks t)) I a multiple of the block;
    row host (columns split): I / (chunks t) a multiple of it (blocks then lie inside rows)."""
    shape = f"[{out_features}, {in_features}]"
    if tp_size == 1 or mode == "replicated":  # the shard is the whole W
        ok, rule = (out_features * in_features) % block_size == 0, "O*I"
    elif mode == "row":
        ok, rule = (in_features // (chunks * tp_size)) % block_size == 0, f"I/(TP*{chunks})"
    else:
        ok, rule = ((out_features // (chunks * tp_size)) * in_features) % block_size == 0, f"(O/(TP*{chunks}))*I"
    if not ok:
        raise ValueError(f"{module}: LoftQ quantises blocks of {block_size} consecutive elements of the weight "
                         f"{shape} ({mode}-parallel) but at TP size {tp_size} {rule} is not a multiple of "
                         f"{block_size}: a block would straddle two TP shards (change the TP size or leave "
                         "this module out of target_modules)")


def _check_bits(bits: int) -> None:
    if bits not in (2, 4, 8):
        raise ValueError(f"LoftQ quantises to 2, 4 or 8 bits, got loftq_bits={bits}")
