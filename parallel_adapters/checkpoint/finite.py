"""Non-finite values (NaN, inf) are stopped at every door: save, verify, export, merge.

A NaN in one factor poisons every logit of a merged model, and nothing downstream complains; so
the tools refuse them (naming the tensor or config key) unless `--allow-nonfinite` is given.
"""
from __future__ import annotations

import math
from typing import Any, Iterator, Mapping

import torch

from parallel_adapters.user_errors import UserError

ALLOW_FLAG = "--allow-nonfinite"


def nonfinite_count(t: torch.Tensor) -> int:
    """How many NaN/inf entries a floating tensor holds (0 for integer tensors)."""
    if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
        return 0
    finite = torch.isfinite(t)
    return 0 if bool(finite.all()) else int(finite.numel() - finite.sum())


def check_tensor(name: str, t: torch.Tensor, where: str, allow: bool = False) -> None:
    """UserError if `t` holds NaN/inf (unless `allow`)."""
    if allow:
        return
    bad = nonfinite_count(t)
    if bad:
        raise UserError(f"{where}: tensor {name!r} has {bad} non-finite value(s) (NaN or inf) of {t.numel()}; "
                        f"refusing to write it (pass {ALLOW_FLAG} to write it anyway)")


def _walk(value: Any, key: str) -> Iterator[tuple[str, float]]:
    if isinstance(value, float):
        yield key, value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _walk(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _walk(v, f"{key}[{i}]")


def nonfinite_config_keys(config: Mapping[str, Any]) -> list[str]:
    """Dotted keys of the config's float values that are NaN or inf."""
    return [key for key, value in _walk(config, "") if not math.isfinite(value)]


def check_config(config: Mapping[str, Any], where: str, allow: bool = False) -> None:
    bad = [] if allow else nonfinite_config_keys(config)
    if bad:
        raise UserError(f"{where}: non-finite config value(s) {', '.join(bad)}; refusing to use them "
                        f"(pass {ALLOW_FLAG} to go on anyway)")


def delta_is_finite(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, dtype: torch.dtype) -> bool:
    """Whether scaling * B @ A is finite in `dtype`, without forming it when a bound suffices:
    |(B A)_ij| <= ||B_i|| ||A_:j|| (Cauchy-Schwarz), so a finite bound below dtype's max settles it."""
    a, b = lora_a.double(), lora_b.double()
    if nonfinite_count(a) or nonfinite_count(b) or not math.isfinite(scaling):
        return False
    limit = torch.finfo(dtype).max if dtype.is_floating_point else torch.finfo(torch.float32).max
    if a.numel() == 0 or b.numel() == 0:
        return True
    bound = abs(scaling) * float(b.norm(dim=1).max()) * float(a.norm(dim=0).max())
    if bound < limit:
        return True
    return nonfinite_count((scaling * (b @ a)).to(dtype)) == 0
