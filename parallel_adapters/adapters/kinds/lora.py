"""LoRA as an adapter kind: y = x W^T + s (drop(x) A^T) B^T (docs/design.md section 4).

Legend: T tokens, I in, O out, r rank, t = TP size, s scale.  Tensors and slots per host:

    host        A (`lora_A`)              B (`lora_B`)             slots filled
    column      replicated [r, I]         B_i [O/t, r] like W      input_columns z = drop(x) A^T (r
                                                                   columns in the SP all-gather),
                                                                   local_addend y + s z B_i^T
    row         A_i [r, I/t] like W       replicated [O, r]        partial_addend p + s (drop(x_i) A_i^T) B^T
    replicated  replicated                replicated               local_addend y + s (drop(x) A^T) B^T

The math is in `adapters/functional.py`; this module says which tensor is which and where it goes.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

import torch

from parallel_adapters.adapters import functional as lf
from parallel_adapters.adapters.kinds import register_kind
from parallel_adapters.adapters.kinds.protocol import (
    INPUT_COLUMNS, LOCAL_ADDEND, PARTIAL_ADDEND, AdapterKind, AdapterSettings, AdapterView, TensorDecl,
)
from parallel_adapters.config import LoraConfig, lora_scaling, pattern_value
from parallel_adapters.mcore.compat import LinearGeometry

LORA_A, LORA_B = "lora_A", "lora_B"  # tensor names: `<module>.lora_A.<adapter>.weight`, as PEFT


class LoRAKind(AdapterKind):
    name = "lora"
    config_class = LoraConfig
    peft_type = "LORA"
    hyperparameters = ("r", "lora_alpha", "scaling")
    pattern_fields = ("rank_pattern", "alpha_pattern")
    dropout_stream = "lora-dropout/"  # names of the adapters' RNG-tracker states
    slot_table = MappingProxyType({
        "column": frozenset({INPUT_COLUMNS, LOCAL_ADDEND}),
        "row": frozenset({PARTIAL_ADDEND}),
        "replicated": frozenset({LOCAL_ADDEND}),
    })

    def accepts(self, config: Any) -> bool:
        return isinstance(config, LoraConfig) and not config.use_dora  # use_dora: kinds/dora.py

    def settings(self, config: LoraConfig, module_name: str, geometry: LinearGeometry) -> AdapterSettings:
        r = pattern_value(module_name, config.rank_pattern, config.r)
        alpha = pattern_value(module_name, config.alpha_pattern, config.lora_alpha)
        if r > min(geometry.in_features, geometry.out_features):
            raise ValueError(
                f"LoraConfig.r (or rank_pattern) = {r} for module {module_name} exceeds "
                f"min(in_features={geometry.in_features}, out_features={geometry.out_features})"
            )
        hparams = {"r": r, "lora_alpha": alpha, "scaling": lora_scaling(alpha, r, config.use_rslora)}
        return AdapterSettings(hparams, config.lora_dropout, config.seed)

    def tensors(self, geometry: LinearGeometry, hparams: Mapping[str, Any]) -> tuple[TensorDecl, ...]:
        spec_a, spec_b = lf.lora_factor_specs(geometry.parallel_mode, geometry.chunks)
        r = hparams["r"]
        return (TensorDecl(LORA_A, (r, geometry.in_features), spec_a, "spec_a"),
                TensorDecl(LORA_B, (geometry.out_features, r), spec_b, "spec_b"))

    def full_tensors(self, config: LoraConfig, geometry: LinearGeometry, hparams: Mapping[str, Any],
                     generator: torch.Generator) -> dict[str, torch.Tensor]:
        a, b = lf.init_lora_factors(geometry.out_features, geometry.in_features, hparams["r"],
                                    config.init_lora_weights, generator, torch.float64)
        return {LORA_A: a, LORA_B: b}

    def merged_delta(self, view: AdapterView) -> torch.Tensor:
        """s B_i A (column) or s B A_i (row): this shard's update, no communication."""
        return lf.lora_delta(view.tensors[LORA_A], view.tensors[LORA_B], view.hparams["scaling"])

    def describe(self, hparams: Mapping[str, Any]) -> str:
        return f"r={hparams['r']}"

    def input_columns(self, view: AdapterView, x: torch.Tensor) -> torch.Tensor:
        """z = drop(x) A^T: [..., I] -> [..., r]."""
        return lf.lora_down(x, view.tensors[LORA_A], view.dropout)

    def local_addend(self, view: AdapterView, x: torch.Tensor, y: torch.Tensor,
                     columns: torch.Tensor | None) -> torch.Tensor:
        """y + s z B^T, z the input columns where the host carried them, else computed here."""
        z = self.input_columns(view, x) if columns is None else columns
        return lf.add_lora_up(y, z, view.tensors[LORA_B], view.hparams["scaling"])

    partial_addend = local_addend  # the row layer's partial takes the same addend, before its reduction


LORA = register_kind(LoRAKind())


def replace_factors(host, adapter_name: str, local_a: torch.Tensor, local_b: torch.Tensor,
                    r: int, alpha: float, scaling: float) -> None:
    """Swap in new factor SHARDS (possibly of another rank r) on `host`, e.g. from EVA."""
    hparams = {"r": r, "lora_alpha": alpha, "scaling": scaling}
    host.replace_tensors(adapter_name, {LORA_A: local_a, LORA_B: local_b}, hparams)
