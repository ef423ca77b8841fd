"""LoKr (`LoKrConfig`) as an adapter kind: the weight update is a Kronecker product,
dW = s (w1 kron w2), s = alpha / r, with PEFT's factorisation O = o1 o2, I = i1 i2
(`factorization(dim, decompose_factor)`, o1 <= o2, i1 <= i2): w1 [o1, i1], w2 [o2, i2].  w2 is the
rank-r product w2_a [o2, r] w2_b [r, i2] when r < max(o2, i2) / 2, and w1 likewise (w1_a [o1, r],
w1_b [r, i1]) when also `decompose_both` (PEFT's names `lokr_w1`, `lokr_w1_a`, ...).

Row i1 o2 + i2 of dW is s w1[i1] kron w2[i2] (and the same for columns), so a contiguous split of
dW's rows over t ranks is a split of w1's rows when t divides o1; of its columns, of w1's columns
when t divides i1.  Each rank then forms only its shard dW_i from its shard of w1 (or w1_a / w1_b)
and all of w2; no collective:

    host        w1 / w1_a [o1, .]        w1_b [r, i1]            w2 (w2_a, w2_b)    slot
    column      split by rows (chunks)   replicated              replicated         weight_delta
    row         replicated (w1_a)        split by columns        replicated         weight_delta
    (w1 on a row host: split by columns)

A layer whose factorisation does not split so is refused, naming the TP sizes that would.  The
replicated tensors' gradients are partial sums over TP (finalize_grads sums them).

Export: PEFT factorises each HF module on its own, so a Kronecker product over a fused Megatron
module (linear_qkv: q/k/v interleaved per query group; linear_fc1: [gate; up]) is no PEFT LoKr of
its parts, and the output layer's padded vocabulary changes O; those modules train but are refused
at export.  linear_proj and linear_fc2 (o_proj, down_proj) export exactly.
"""
from __future__ import annotations

import dataclasses
import math
from types import MappingProxyType
from typing import Any, Mapping

import torch

from parallel_adapters.adapters.kinds import register_kind
from parallel_adapters.adapters.kinds.protocol import (
    WEIGHT_DELTA, AdapterKind, AdapterSettings, AdapterView, TensorDecl, rank_fields,
)
from parallel_adapters.config import LoKrConfig, pattern_value
from parallel_adapters.distributed.geometry import LINEAR_MODES, LinearGeometry
from parallel_adapters.distributed.sharding import REPLICATED, ShardSpec

W1, W1A, W1B, W2, W2A, W2B = "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"
_NOT_EXPORTED = {"linear_qkv": "q/k/v are interleaved per query group in one fused weight",
                 "linear_fc1": "gate and up are stacked in one fused weight",
                 "output_layer": "the padded vocabulary changes the output size"}


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's (LyCORIS') split of `dimension` into m <= n, m n = dimension: m = `factor` when it
    divides; else the divisor pair nearest the square root with m at most `factor` (-1: any)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        nxt = m + 1
        while dimension % nxt:
            nxt += 1
        if nxt + dimension // nxt > m + n or nxt > limit:
            break
        m, n = nxt, dimension // nxt
    return min(m, n), max(m, n)


def lokr_layout(out_features: int, in_features: int, r: int, decompose_factor: int,
                decompose_both: bool) -> dict[str, Any]:
    """PEFT's shapes for a linear layer: the factors (o1, o2, i1, i2) and whether w1, w2 are whole."""
    o1, o2 = factorization(out_features, decompose_factor)
    i1, i2 = factorization(in_features, decompose_factor)
    return {"lokr_factors": (o1, o2, i1, i2), "lokr_w1_whole": not (decompose_both and r < max(o1, i1) / 2),
            "lokr_w2_whole": not r < max(o2, i2) / 2}


def lokr_delta(w1: torch.Tensor, w2: torch.Tensor, scaling: float) -> torch.Tensor:
    """s (w1 kron w2); with w1 a shard of rows (or columns), the same shard of the whole update."""
    return scaling * torch.kron(w1, w2)


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """nn.init.kaiming_uniform_(a=sqrt(5)) on a [rows, fan_in] matrix: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(shape[1])
    return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound


def _split_sizes(size: int, chunks: int) -> list[int]:
    return [t for t in range(1, size + 1) if size % (t * chunks) == 0]


class LoKrKind(AdapterKind):
    name = "lokr"
    config_class = LoKrConfig
    peft_type = "LOKR"
    hyperparameters = ("r", "alpha", "scaling", "lokr_factors", "lokr_w1_whole", "lokr_w2_whole")
    pattern_fields = ("rank_pattern", "alpha_pattern")
    slot_table = MappingProxyType({mode: frozenset({WEIGHT_DELTA}) for mode in LINEAR_MODES})
    tensor_axes = MappingProxyType({n: (None, None) for n in (W1, W1A, W1B, W2, W2A, W2B)})
    """No tensor runs along the base weight's rows or columns: a module exports whole (or not at all)."""
    dropout_stream = "lokr-dropout/"  # RNG-tracker states of module / rank dropout (hosts/dropout.py)

    def settings(self, config: LoKrConfig, module_name: str, geometry: LinearGeometry) -> AdapterSettings:
        mode = geometry.parallel_mode
        if mode not in LINEAR_MODES:
            raise ValueError(f"module {module_name}: LoKr is implemented for linear layers only "
                             f"(this is a {mode!r} layer); exclude it with exclude_modules")
        r = pattern_value(module_name, config.rank_pattern, config.r)
        alpha = pattern_value(module_name, config.alpha_pattern, config.alpha)
        out, inp = geometry.out_features, geometry.in_features
        layout = lokr_layout(out, inp, r, config.decompose_factor, config.decompose_both)
        o1, o2, i1, i2 = layout["lokr_factors"]
        t, chunks = geometry.tp_size, (geometry.chunks if mode == "column" else 1)
        split, side = (o1, "rows") if mode == "column" else (i1, "columns")
        if mode != "replicated" and split % (t * chunks):
            sizes = _split_sizes(split, chunks)
            raise ValueError(
                f"module {module_name}: LoKr factorises its [{out}, {inp}] weight as ({o1}x{o2}) x ({i1}x{i2}) "
                f"(decompose_factor={config.decompose_factor}); TP={t} must split w1's {split} {side}"
                + (f" in each of {chunks} fused blocks" if chunks > 1 else "")
                + f", which works for TP sizes {sizes}; choose another decompose_factor or exclude the module")
        return _with_dropouts(AdapterSettings({"r": r, "alpha": alpha, "scaling": alpha / r, **layout}, 0.0,
                                              config.seed), config)

    def tensors(self, geometry: LinearGeometry, hparams: Mapping[str, Any]) -> tuple[TensorDecl, ...]:
        r, mode = hparams["r"], geometry.parallel_mode
        o1, o2, i1, i2 = hparams["lokr_factors"]
        rows = ShardSpec(dim=0, chunks=geometry.chunks) if mode == "column" else REPLICATED
        cols = ShardSpec(dim=1) if mode == "row" else REPLICATED
        if hparams["lokr_w1_whole"]:
            first = (TensorDecl(W1, (o1, i1), rows if mode == "column" else cols),)
        else:
            first = (TensorDecl(W1A, (o1, r), rows), TensorDecl(W1B, (r, i1), cols))
        if hparams["lokr_w2_whole"]:
            return first + (TensorDecl(W2, (o2, i2), REPLICATED),)
        return first + (TensorDecl(W2A, (o2, r), REPLICATED), TensorDecl(W2B, (r, i2), REPLICATED))

    def full_tensors(self, config: LoKrConfig, geometry: LinearGeometry, hparams: Mapping[str, Any],
                     generator: torch.Generator) -> dict[str, torch.Tensor]:
        """PEFT's init: Kaiming-uniform, then w1 (or w1_a) zero (init_weights=True) or w2 (or w2_b)
        zero ("lycoris"); init_weights=False: all random.  Either zero makes dW = 0."""
        full = {d.name: _kaiming_uniform(d.global_shape, generator) for d in self.tensors(geometry, hparams)}
        if config.init_weights is True:
            full[W1 if W1 in full else W1A].zero_()
        elif config.init_weights == "lycoris":
            full[W2 if W2 in full else W2B].zero_()
        return full

    def merged_delta(self, view: AdapterView) -> torch.Tensor:
        t = view.tensors
        w1 = t[W1] if W1 in t else t[W1A] @ t[W1B]
        w2 = t[W2] if W2 in t else t[W2A] @ t[W2B]
        return lokr_delta(w1, w2, view.hparams["scaling"])

    def weight_delta(self, view: AdapterView) -> torch.Tensor:
        return self.merged_delta(view)

    def describe(self, hparams: Mapping[str, Any]) -> str:
        o1, o2, i1, i2 = hparams["lokr_factors"]
        return f"r={hparams['r']}, ({o1}x{o2}) x ({i1}x{i2})"

    def peft_key(self, tensor_name: str) -> str:
        return tensor_name

    # -- offline -------------------------------------------------------------------------------

    def stored_hparams(self, config: Mapping[str, Any], module: str,
                       shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
        leaf = module.rsplit(".", 1)[-1]
        if leaf in _NOT_EXPORTED:
            raise ValueError(f"{module}: a LoKr adapter on {leaf} has no exact PEFT form ({_NOT_EXPORTED[leaf]}, "
                             "and PEFT factorises each HF module on its own); the PEFT export and the offline merge take "
                             "LoKr on linear_proj / linear_fc2 only (merge_adapter merges it in Megatron)")
        r = pattern_value(module, config.get("rank_pattern") or {}, config.get("r", 8))
        alpha = pattern_value(module, config.get("alpha_pattern") or {}, config.get("alpha", 8))
        return _from_shapes(module, shapes, r, alpha)

    def peft_hparams(self, peft_config: Mapping[str, Any], module: str,
                     shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
        r = pattern_value(module, peft_config.get("rank_pattern") or {}, peft_config.get("r", 8))
        alpha = pattern_value(module, peft_config.get("alpha_pattern") or {}, peft_config.get("alpha", 8))
        return _from_shapes(module, shapes, r, alpha)

    def peft_config(self, config: Mapping[str, Any], modules: Mapping[str, Mapping[str, Any]],
                    target_modules: list[str], base_model_name_or_path: str | None) -> dict[str, Any]:
        """PEFT's LoKrConfig fields: the most common r / alpha, patterns for the exceptions, and the
        run's decompose_factor / decompose_both (the shapes were made with them)."""
        return {
            "peft_type": self.peft_type, "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path or config.get("base_model_name_or_path"),
            **rank_fields(modules, "alpha"), "target_modules": target_modules,
            "decompose_both": bool(config.get("decompose_both", False)),
            "decompose_factor": int(config.get("decompose_factor", -1)),
            **_peft_dropouts(config), "use_effective_conv2d": False,
            "init_weights": True, "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None,
            "modules_to_save": None, "inference_mode": True, "revision": None,
        }


def _with_dropouts(settings: AdapterSettings, config: LoKrConfig) -> AdapterSettings:
    """PEFT's LoKr rank dropout divides the kept rows by their mean only with rank_dropout_scale."""
    return dataclasses.replace(settings, rank_dropout=config.rank_dropout, module_dropout=config.module_dropout,
                               rank_dropout_scale=config.rank_dropout_scale)


def _peft_dropouts(config: Mapping[str, Any]) -> dict[str, Any]:
    return {"rank_dropout": float(config.get("rank_dropout", 0.0)),
            "module_dropout": float(config.get("module_dropout", 0.0)),
            "rank_dropout_scale": bool(config.get("rank_dropout_scale", False))}


def _from_shapes(module: str, shapes: Mapping[str, tuple[int, ...]], r: int, alpha: float) -> dict[str, Any]:
    """Hyperparameters of a stored module: which factors are whole, and (o1, o2, i1, i2), from the shapes."""
    w1_whole, w2_whole = W1 in shapes, W2 in shapes
    need = ([W1] if w1_whole else [W1A, W1B]) + ([W2] if w2_whole else [W2A, W2B])
    if sorted(need) != sorted(shapes) or any(len(s) != 2 for s in shapes.values()):
        raise ValueError(f"{module}: LoKr tensors {sorted(shapes)} are not one of PEFT's layouts "
                         f"(lokr_w1 or lokr_w1_a/b, and lokr_w2 or lokr_w2_a/b, all 2-D)")
    o1, i1 = shapes[W1] if w1_whole else (shapes[W1A][0], shapes[W1B][1])
    o2, i2 = shapes[W2] if w2_whole else (shapes[W2A][0], shapes[W2B][1])
    ranks = ({s[1] for n, s in shapes.items() if n.endswith("_a")}
             | {s[0] for n, s in shapes.items() if n.endswith("_b")})
    if ranks - {r}:
        raise ValueError(f"{module}: the LoKr factors have rank {sorted(ranks)}, the adapter config says r={r}")
    return {"r": r, "alpha": alpha, "scaling": alpha / r, "lokr_factors": (o1, o2, i1, i2),
            "lokr_w1_whole": w1_whole, "lokr_w2_whole": w2_whole}


LOKR = register_kind(LoKrKind())
