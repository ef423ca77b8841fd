"""LoHa (`LoHaConfig`) as an adapter kind: the weight update is the Hadamard product of two rank-r
products, dW = s (w1a w1b) * (w2a w2b), s = alpha / r, with PEFT's shapes w1a, w2a [O, r] and
w1b, w2b [r, I] (`hada_w1_a` ...).  y = x (W + dW)^T + b.

Row j of dW depends only on rows j of w1a and w2a, and column k only on columns k of w1b and w2b,
so each rank forms its own shard of dW from its shards (t = TP size):

    host        w1a, w2a [O, r]        w1b, w2b [r, I]        slot
    column      split like W's rows    replicated             weight_delta: y_i = x (W_i + dW_i)^T
    row         replicated             split like W's cols    weight_delta: p_i = x_i (W_i + dW_i)^T
    replicated  replicated             replicated             weight_delta

The replicated factors' gradients are partial sums over TP (finalize_grads sums them); no
collective is added.  The same row property makes the export of a fused module exact: its
q/k/v (gate/up) parts are LoHa adapters with w1a, w2a split by rows and w1b, w2b shared.
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
from parallel_adapters.config import LoHaConfig, pattern_value
from parallel_adapters.distributed.geometry import LINEAR_MODES, LinearGeometry
from parallel_adapters.distributed.sharding import REPLICATED, ShardSpec

W1A, W1B, W2A, W2B = "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"  # PEFT's names (ParameterDicts)
_ROW_FACTORS, _COLUMN_FACTORS = (W1A, W2A), (W1B, W2B)


def loha_delta(w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor,
               scaling: float) -> torch.Tensor:
    """s (w1a w1b) * (w2a w2b): [O, r] x [r, I] twice -> [O, I] (any shard of rows or columns)."""
    return scaling * (w1a @ w1b) * (w2a @ w2b)


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """nn.init.kaiming_uniform_(a=sqrt(5)) on a [rows, fan_in] matrix: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(shape[1])
    return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound


class LoHaKind(AdapterKind):
    name = "loha"
    config_class = LoHaConfig
    peft_type = "LOHA"
    hyperparameters = ("r", "alpha", "scaling")
    pattern_fields = ("rank_pattern", "alpha_pattern")
    slot_table = MappingProxyType({mode: frozenset({WEIGHT_DELTA}) for mode in LINEAR_MODES})
    tensor_axes = MappingProxyType({W1A: (0, None), W1B: (None, 1), W2A: (0, None), W2B: (None, 1)})
    dropout_stream = "loha-dropout/"  # RNG-tracker states of module / rank dropout (hosts/dropout.py)

    def settings(self, config: LoHaConfig, module_name: str, geometry: LinearGeometry) -> AdapterSettings:
        if geometry.parallel_mode not in LINEAR_MODES:
            raise ValueError(f"module {module_name}: LoHa is implemented for linear layers only "
                             f"(this is a {geometry.parallel_mode!r} layer); exclude it with exclude_modules")
        r = pattern_value(module_name, config.rank_pattern, config.r)
        alpha = pattern_value(module_name, config.alpha_pattern, config.alpha)
        return _with_dropouts(AdapterSettings({"r": r, "alpha": alpha, "scaling": alpha / r}, 0.0, config.seed), config)

    def tensors(self, geometry: LinearGeometry, hparams: Mapping[str, Any]) -> tuple[TensorDecl, ...]:
        r, mode, out, inp = hparams["r"], geometry.parallel_mode, geometry.out_features, geometry.in_features
        row_spec = ShardSpec(dim=0, chunks=geometry.chunks) if mode == "column" else REPLICATED
        col_spec = ShardSpec(dim=1) if mode == "row" else REPLICATED
        return (TensorDecl(W1A, (out, r), row_spec), TensorDecl(W1B, (r, inp), col_spec),
                TensorDecl(W2A, (out, r), row_spec), TensorDecl(W2B, (r, inp), col_spec))

    def full_tensors(self, config: LoHaConfig, geometry: LinearGeometry, hparams: Mapping[str, Any],
                     generator: torch.Generator) -> dict[str, torch.Tensor]:
        """PEFT's init: w1a, w1b, w2a Kaiming-uniform, w2b zero (dW = 0); init_weights=False: all four."""
        full = {d.name: _kaiming_uniform(d.global_shape, generator) for d in self.tensors(geometry, hparams)}
        if config.init_weights:
            full[W2B].zero_()
        return full

    def merged_delta(self, view: AdapterView) -> torch.Tensor:
        t = view.tensors
        return loha_delta(t[W1A], t[W1B], t[W2A], t[W2B], view.hparams["scaling"])

    def weight_delta(self, view: AdapterView) -> torch.Tensor:
        return self.merged_delta(view)

    def describe(self, hparams: Mapping[str, Any]) -> str:
        return f"r={hparams['r']}"

    def peft_key(self, tensor_name: str) -> str:
        return tensor_name

    # -- offline -------------------------------------------------------------------------------

    def stored_hparams(self, config: Mapping[str, Any], module: str,
                       shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
        r = _check_factors(module, shapes)
        alpha = pattern_value(module, config.get("alpha_pattern") or {}, config.get("alpha", 8))
        return {"r": r, "alpha": alpha, "scaling": alpha / r}

    def peft_hparams(self, peft_config: Mapping[str, Any], module: str,
                     shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
        r = pattern_value(module, peft_config.get("rank_pattern") or {}, peft_config.get("r", 8))
        alpha = pattern_value(module, peft_config.get("alpha_pattern") or {}, peft_config.get("alpha", 8))
        stored = _check_factors(module, shapes)
        if stored != r:
            raise ValueError(f"{module}: the adapter's factors have rank {stored}, adapter_config.json says r={r}")
        return {"r": r, "alpha": alpha, "scaling": alpha / r}

    def peft_config(self, config: Mapping[str, Any], modules: Mapping[str, Mapping[str, Any]],
                    target_modules: list[str], base_model_name_or_path: str | None) -> dict[str, Any]:
        """PEFT's LoHaConfig fields: the most common r / alpha, patterns for the exceptions."""
        return {
            "peft_type": self.peft_type, "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path or config.get("base_model_name_or_path"),
            **rank_fields(modules, "alpha"), "target_modules": target_modules,
            **_peft_dropouts(config), "use_effective_conv2d": False, "init_weights": True,
            "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None,
            "modules_to_save": None, "inference_mode": True, "revision": None,
        }


def _with_dropouts(settings: AdapterSettings, config: LoHaConfig) -> AdapterSettings:
    """PEFT's LoHa rank dropout divides the kept rows by their mean (always); the host draws and applies it."""
    return dataclasses.replace(settings, rank_dropout=config.rank_dropout, module_dropout=config.module_dropout,
                               rank_dropout_scale=True)


def _peft_dropouts(config: Mapping[str, Any]) -> dict[str, float]:
    return {name: float(config.get(name, 0.0)) for name in ("rank_dropout", "module_dropout")}


def _check_factors(module: str, shapes: Mapping[str, tuple[int, ...]]) -> int:
    """The rank of a stored module's four factors (all there, 2-D, sharing r)."""
    missing = [n for n in (W1A, W1B, W2A, W2B) if n not in shapes]
    if missing or len(shapes) != 4:
        raise ValueError(f"{module}: LoHa factors {missing or 'other than the four'} (have {sorted(shapes)})")
    ranks = {shapes[W1A][1], shapes[W2A][1], shapes[W1B][0], shapes[W2B][0]}
    if len(ranks) != 1 or any(len(s) != 2 for s in shapes.values()):
        raise ValueError(f"{module}: LoHa factors {dict(shapes)} do not share one rank")
    return ranks.pop()


LOHA = register_kind(LoHaKind())
