"""Inverted dropout with an explicit generator: equal generator states give equal masks.

Used by the adapters' own seeded dropout and by `mcore.compat.TrackerDropout` (masks drawn from a
state of Megatron's RNG tracker), so both draw masks the same way.
"""
from __future__ import annotations

import torch


def dropout_mask_(x: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Inverted-dropout of x with a mask drawn from `generator` (so equal seeds give equal masks;
    None: the default generator of x's device)."""
    keep = torch.empty(x.shape, dtype=x.dtype, device=x.device).bernoulli_(1.0 - p, generator=generator)
    return x * keep / (1.0 - p)
