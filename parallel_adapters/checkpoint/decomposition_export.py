"""A PiSSA/OLoRA checkpoint as a LoRA on the ORIGINAL base (PEFT's
`save_pretrained(path_initial_model_for_weight_conversion=...)`).  Offline, pure.

The trained factors apply to the residual W - s B0 A0; on the original W the same model is
W + s (B A - B0 A0) = W + s B' A' with A' = [A; A0] (2r x I) and B' = [B, -B0] (O x 2r).  PEFT's
config rule keeps s: r -> 2r, lora_alpha -> 2 alpha (sqrt(2) alpha with rsLoRA, whose s is
alpha / sqrt(r)), rank_pattern and alpha_pattern values doubled (refused with rsLoRA, as PEFT does),
init_lora_weights -> True.  The checkpoint stores A0, B0 as `<module>.<tensor>.<adapter>.initial`
(adapters/decomposition_state.py).
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Mapping

import torch

from parallel_adapters.adapters.decomposition_state import INITIAL_SUFFIX
from parallel_adapters.adapters.kinds.lora import LORA_A, LORA_B
from parallel_adapters.user_errors import UserError

CONVERT_FLAG = "--convert-to-lora"

Read = Callable[[str], torch.Tensor]


def initial_names(names: Any) -> list[str]:
    return sorted(n for n in names if n.endswith(INITIAL_SUFFIX))


def converted_config(config: Mapping[str, Any]) -> dict:
    """The adapter config of the rank-2r LoRA (PEFT's rule, see the module doc)."""
    out = dict(config)
    rslora = bool(out.get("use_rslora"))
    if rslora and (out.get("rank_pattern") or out.get("alpha_pattern")):
        raise UserError("export --convert-to-lora: use_rslora with rank_pattern/alpha_pattern cannot keep every "
                        "module's scaling after doubling the rank (PEFT refuses it too)")
    out["r"] = 2 * out["r"]
    out["lora_alpha"] = out["lora_alpha"] * (math.sqrt(2) if rslora else 2)
    out["rank_pattern"] = {k: 2 * v for k, v in (out.get("rank_pattern") or {}).items()}
    out["alpha_pattern"] = {k: 2 * v for k, v in (out.get("alpha_pattern") or {}).items()}
    out["init_lora_weights"] = True
    out.pop("corda_config", None)  # a plain LoRA now (PEFT would warn on it)
    return out


def converted_factors(a: torch.Tensor, b: torch.Tensor, a0: torch.Tensor, b0: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') = ([A; A0], [B, -B0]): s B' A' = s B A - s B0 A0."""
    return torch.cat([a, a0.to(a.dtype)], dim=0), torch.cat([b, -b0.to(b.dtype)], dim=1)


def refuse_unconverted(config: Mapping[str, Any], where: str) -> None:
    """UserError: a PiSSA/OLoRA adapter's factors need the residual base, which is never exported."""
    raise UserError(f"{where}: the adapter was initialised with init_lora_weights="
                    f"{config.get('init_lora_weights')!r}, so its factors apply to the residual base "
                    "W - s*B0*A0, not to the original Hugging Face base; pass " + CONVERT_FLAG +
                    " (convert_to_lora=True) to write a rank-2r LoRA that loads on the original base")


def convert_view(meta: Mapping[str, torch.Tensor], read: Read, config: Mapping[str, Any], convert: bool,
                 where: str) -> tuple[dict[str, torch.Tensor], Read, dict]:
    """(meta, read, config) with the initial factors folded into rank-2r factors when `convert`;
    unchanged for an adapter without initial factors (refused with `convert`, which would have
    nothing to convert); UserError for one with them but without `convert`."""
    initial = initial_names(meta)
    if initial and config.get("init_lora_weights") == "loftq":
        return _loftq_view(meta, read, config, convert, where)
    if not initial:
        if convert:
            raise UserError(f"{where}: {CONVERT_FLAG} converts a PiSSA/OLoRA adapter (one that stores its initial "
                            "factors); this checkpoint has none")
        return dict(meta), read, dict(config)
    if not convert:
        refuse_unconverted(config, where)
    if config.get("adapter_kind", "lora") != "lora" or config.get("use_dora"):
        raise UserError(f"{where}: {CONVERT_FLAG} writes a plain LoRA; a DoRA magnitude cannot be carried over to "
                        "the original base")
    pairs = {n.removesuffix(INITIAL_SUFFIX) + ".weight": n for n in initial}
    missing = sorted(set(pairs) - set(meta))
    if missing:
        raise UserError(f"{where}: initial factors without trained ones: {', '.join(missing[:3])}")

    def converted(name: str) -> torch.Tensor:
        if name not in pairs:
            return read(name)
        mine = _sibling(name)
        a_name, b_name = (name, mine) if f".{LORA_A}." in name else (mine, name)
        a, b = converted_factors(read(a_name), read(b_name), read(pairs[a_name]), read(pairs[b_name]))
        return a if name == a_name else b

    shapes = {}
    for name, t in meta.items():
        if name.endswith(INITIAL_SUFFIX):
            continue
        if name in pairs:
            dim = 0 if f".{LORA_A}." in name else 1
            shape = list(t.shape)
            shape[dim] *= 2
            shapes[name] = torch.empty(shape, dtype=t.dtype, device="meta")
        else:
            shapes[name] = t
    return shapes, converted, converted_config(config)


def _sibling(name: str) -> str:
    """lora_A's key for lora_B's and back."""
    a, b = f".{LORA_A}.", f".{LORA_B}."
    return name.replace(a, b) if a in name else name.replace(b, a)


def _loftq_view(meta: Mapping[str, torch.Tensor], read: Read, config: Mapping[str, Any], convert: bool,
                where: str) -> tuple[dict[str, torch.Tensor], Read, dict]:
    """LoftQ: the trained factors as they are (without the stored pre-quantisation factors), with a
    warning that they need the de-quantised base; `convert` refused (no plain-LoRA form exists)."""
    from parallel_adapters.checkpoint.loftq_merge import NEEDS_DEQUANTIZED_BASE

    if convert:
        raise UserError(f"{where}: {CONVERT_FLAG} cannot convert a LoftQ adapter: the trained model is Q + s*B*A with "
                        "Q the de-quantised base, and W - Q is full rank, so no low-rank adapter on the original base "
                        "reproduces it (PEFT has no such conversion either); export without the flag, or merge")
    warnings.warn(f"{where}: {NEEDS_DEQUANTIZED_BASE}", stacklevel=3)
    return {n: t for n, t in meta.items() if not n.endswith(INITIAL_SUFFIX)}, read, dict(config)
