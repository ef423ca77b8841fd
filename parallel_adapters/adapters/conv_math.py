"""Pure math of the non-LoRA-layout adapters on a plain nn.Conv2d: ALF's balanced LoRA, and PEFT's
IA3, LoHa and LoKr conv forms.  No state, no communication (a conv2d host is never TP-split).

Legend: O out-channels, I in-channels, g groups, Ig = I / g, (kh, kw) kernel, r rank, s scale.
The base weight is W [O, Ig, kh, kw]; every delta below has that shape.

ALF (alf.pretrained_models.model_adapters.lora.Conv2dAdapter): W is read as an (O kh) x (Ig kw)
matrix and decomposed, so a small O still gives a low-rank adapter.  A [r, Ig kw], B [O kh, r]:
    delta[o, i, u, v] = s sum_r B'[o, r, u] A'[r, i, v],  A' = A.reshape(r, Ig, kw),
                                                           B' = B.reshape(O, r, kh),
computed as two convs (A' a 1 x kw conv along the width, B' a kh x 1 conv along the height)
when g = 1 and the padding is numeric, else as one conv with the delta kernel.  s = weight / r.
When r > nrows ncols / (nrows + ncols) ALF keeps one full matrix A [O kh, Ig kw] (zero at init),
delta = s A.reshape(W's shape), s = weight.

LoHa (PEFT's Conv2d): flat w1a, w2a [O, r], w1b, w2b [r, Ig kh kw], delta = s (w1a w1b) * (w2a w2b)
reshaped; effective conv (`use_effective_conv2d`, kernel not 1x1): t1, t2 [r, r, kh, kw],
w1a, w2a [r, O], w1b, w2b [r, Ig], delta = s (t1 x1 w1a x2 w1b) * (t2 x1 w2a x2 w2b) (Tucker form).
LoKr (PEFT's Conv2d): delta = s (w1 kron w2), w1 [o1, i1] (O = o1 o2, Ig = i1 i2); w2 whole
[o2, i2, kh, kw], the Tucker t2 x1 w2_a x2 w2_b (effective), or flat w2_a w2_b [o2, i2 kh kw].
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from parallel_adapters.distributed.geometry import ConvShape


def kaiming_uniform(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """nn.init.kaiming_uniform_(a=sqrt(5)) in float64: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in
    the product of every dim after the first (PEFT's init of the LyCORIS tensors)."""
    bound = 1.0 / math.sqrt(math.prod(shape[1:]))
    return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound


def xavier_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """nn.init.xavier_uniform_ on a [rows, cols] matrix in float64 (ALF's init of A)."""
    bound = math.sqrt(6.0 / (shape[0] + shape[1]))
    return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound


def _compute(*tensors: torch.Tensor) -> list[torch.Tensor]:
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    return [t.to(dtype) for t in tensors]


# -- ALF ------------------------------------------------------------------------------------------

def alf_matrix(out_channels: int, in_per_group: int, conv: ConvShape) -> tuple[int, int]:
    """ALF's (nrows, ncols) = (O kh, Ig kw)."""
    return out_channels * conv.kernel_size[0], in_per_group * conv.kernel_size[1]


def alf_low_rank(r: int, nrows: int, ncols: int) -> bool:
    """ALF factors only when (nrows + ncols) r <= nrows ncols: else one full matrix is smaller."""
    return not r > ncols * nrows / (nrows + ncols)


def alf_delta(a: torch.Tensor, b: torch.Tensor | None, weight_shape: tuple[int, ...], scaling: float) -> torch.Tensor:
    """ALF's kernel update [O, Ig, kh, kw] in float32 or wider (differentiable)."""
    if b is None:
        (a,) = _compute(a)
        return a.reshape(weight_shape) * scaling
    a, b = _compute(a, b)
    out, in_g, kh, kw = weight_shape
    r = a.shape[0]
    return torch.einsum("rik,oru->oiuk", a.reshape(r, in_g, kw), b.reshape(out, r, kh)) * scaling


def alf_addend(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None, weight_shape: tuple[int, ...],
               conv: ConvShape, scaling: float,
               dropout: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """s conv(drop(x), delta / s): two thin convs when ALF runs them (g = 1, numeric padding,
    factored), else one conv with the delta kernel."""
    x = dropout(x) if dropout is not None else x
    if b is None or conv.groups != 1 or isinstance(conv.padding, str):
        delta = alf_delta(a, b, weight_shape, scaling).to(x.dtype)
        return F.conv2d(x, delta, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    out, in_g, kh, kw = weight_shape
    r = a.shape[0]
    z = F.conv2d(x, a.to(x.dtype).reshape(r, in_g, 1, kw), None, (1, conv.stride[1]), (0, conv.padding[1]),
                 (1, conv.dilation[1]))
    y = F.conv2d(z, b.to(x.dtype).reshape(out, r, kh, 1), None, (conv.stride[0], 1), (conv.padding[0], 0),
                 (conv.dilation[0], 1))
    return y * scaling


# -- LoHa -----------------------------------------------------------------------------------------

def tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """t [r, r, kh, kw] x1 wa [r, O] x2 wb [r, I] -> [O, I, kh, kw] (PEFT's `make_weight_cp`)."""
    return torch.einsum("ijkl,ip,jq->pqkl", t, wa, wb)


def loha_conv_delta(tensors: dict[str, torch.Tensor], names: tuple[str, ...], weight_shape: tuple[int, ...],
                    scaling: float) -> torch.Tensor:
    """s (w1a w1b) * (w2a w2b) reshaped to W's shape, or with `names` of six (t1 and t2 first
    in each triple) the Tucker form; `names` orders (t1,) w1a, w1b, (t2,) w2a, w2b."""
    parts = _compute(*(tensors[n] for n in names))
    if len(parts) == 6:
        t1, w1a, w1b, t2, w2a, w2b = parts
        return scaling * tucker(t1, w1a, w1b) * tucker(t2, w2a, w2b)
    w1a, w1b, w2a, w2b = parts
    return (scaling * (w1a @ w1b) * (w2a @ w2b)).reshape(weight_shape)


# -- LoKr -----------------------------------------------------------------------------------------

def lokr_conv_delta(w1: torch.Tensor, w2: torch.Tensor, weight_shape: tuple[int, ...], scaling: float) -> torch.Tensor:
    """s (w1 kron w2) as W's shape: w2 a kernel [o2, i2, kh, kw] (w1 gets unit kernel dims) or
    flat [o2, i2 kh kw] (the product's columns are then Ig kh kw in W's order)."""
    w1, w2 = _compute(w1, w2)
    if w2.dim() == 4:
        return scaling * torch.kron(w1[:, :, None, None], w2)
    return (scaling * torch.kron(w1, w2)).reshape(weight_shape)


# -- IA3 ------------------------------------------------------------------------------------------

def channel_view(vector: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """ia3_l [1, C, 1, 1] as [C, 1, 1]: broadcasts over a batched [N, C, H, W] or unbatched
    [C, H, W] activation."""
    return vector.reshape(-1, 1, 1).to(dtype)


def ia3_input_factor(vector: torch.Tensor, out_channels: int, groups: int) -> torch.Tensor:
    """The factor W [O, Ig, kh, kw] is multiplied by when x's channels are scaled by l [I]:
    output channel o of group q reads input channels q Ig .. (q + 1) Ig."""
    lv = vector.reshape(groups, 1, -1)
    return lv.expand(groups, out_channels // groups, lv.shape[-1]).reshape(out_channels, -1, 1, 1)
