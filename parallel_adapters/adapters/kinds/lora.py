"""LoRA as an adapter kind: y = x W^T + s (drop(x) A^T) B^T (docs/design.md section 4).

Legend: T tokens, I in, O out, r rank, t = TP size, s scale.  Tensors and slots per host:

    host        A (`lora_A`)              B (`lora_B`)             slots filled
    column      replicated [r, I]         B_i [O/t, r] like W      input_columns z = drop(x) A^T (r
                                                                   columns in the SP all-gather),
                                                                   local_addend y + s z B_i^T
    row         A_i [r, I/t] like W       replicated [O, r]        partial_addend p + s (drop(x_i) A_i^T) B^T
    replicated  replicated                replicated               local_addend y + s (drop(x) A^T) B^T
    conv2d      [r, I, kh, kw]            [O, r, 1, 1]             local_addend y + s conv1x1(conv(drop(x), A), B)

On lookup tables the tensors are PEFT's `lora_embedding_A` [r, V] / `lora_embedding_B` [H, r] and
the input is not dropped (as PEFT):

    vocab       A_i [r, V/t] like W       replicated [H, r]        partial_addend p + s lookup(A_i^T) B^T
    embedding   replicated                replicated               local_addend y + s lookup(A^T) B^T

The math is in `adapters/functional.py` and `adapters/embedding_conv_math.py`; this module says
which tensor is which and where it goes.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

import torch

from parallel_adapters.adapters import embedding_conv_math as ecm
from parallel_adapters.adapters import functional as lf
from parallel_adapters.adapters.kinds import register_kind
from parallel_adapters.adapters.kinds.protocol import (
    INPUT_COLUMNS, LOCAL_ADDEND, PARTIAL_ADDEND, AdapterKind, AdapterSettings, AdapterView, TensorDecl, rank_fields,
)
from parallel_adapters.config import LoraConfig, decomposition_init, lora_scaling, pattern_value
from parallel_adapters.distributed.sharding import REPLICATED
from parallel_adapters.distributed.geometry import EMBEDDING_MODES, LINEAR_MODES, LinearGeometry

LORA_A, LORA_B = "lora_A", "lora_B"  # tensor names: `<module>.lora_A.<adapter>.weight`, as PEFT
EMBEDDING_A, EMBEDDING_B = "lora_embedding_A", "lora_embedding_B"  # PEFT: `<module>.lora_embedding_A` (no .weight)


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
        "vocab": frozenset({PARTIAL_ADDEND}),
        "embedding": frozenset({LOCAL_ADDEND}),
        "conv2d": frozenset({LOCAL_ADDEND}),
    })
    tensor_axes = MappingProxyType({
        LORA_A: (None, 1), LORA_B: (0, None),          # A [r, in], B [out, r]
        EMBEDDING_A: (1, None), EMBEDDING_B: (None, 0),  # A [r, V], B [H, r]; the table is [V, H]
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
        if geometry.conv is not None and geometry.conv.groups != 1:
            raise ValueError(f"module {module_name}: LoRA on a Conv2d with groups={geometry.conv.groups} is not "
                             "supported (PEFT cannot merge it either); exclude it with exclude_modules")
        if decomposition_init(config.init_lora_weights) is not None and (
                geometry.parallel_mode not in LINEAR_MODES or geometry.conv is not None):
            raise ValueError(f"module {module_name}: LoraConfig.init_lora_weights={config.init_lora_weights!r} "
                             f"applies to linear layers only (as PEFT's), not to a {geometry.parallel_mode!r} "
                             "layer; exclude it with exclude_modules")
        hparams = {"r": r, "lora_alpha": alpha, "scaling": lora_scaling(alpha, r, config.use_rslora)}
        lookup = geometry.parallel_mode in EMBEDDING_MODES
        return AdapterSettings(hparams, 0.0 if lookup else config.lora_dropout, config.seed)  # PEFT drops no ids

    def tensors(self, geometry: LinearGeometry, hparams: Mapping[str, Any]) -> tuple[TensorDecl, ...]:
        r, mode = hparams["r"], geometry.parallel_mode
        if mode in EMBEDDING_MODES:
            spec_a, spec_b = ecm.lora_embedding_specs(mode)
            return (TensorDecl(EMBEDDING_A, (r, geometry.in_features), spec_a, "spec_a"),
                    TensorDecl(EMBEDDING_B, (geometry.out_features, r), spec_b, "spec_b"))
        if geometry.conv is not None:
            kernel = geometry.conv.kernel_size
            return (TensorDecl(LORA_A, (r, geometry.in_features, *kernel), REPLICATED, "spec_a"),
                    TensorDecl(LORA_B, (geometry.out_features, r, 1, 1), REPLICATED, "spec_b"))
        spec_a, spec_b = lf.lora_factor_specs(mode, geometry.chunks)
        return (TensorDecl(LORA_A, (r, geometry.in_features), spec_a, "spec_a"),
                TensorDecl(LORA_B, (geometry.out_features, r), spec_b, "spec_b"))

    def full_tensors(self, config: LoraConfig, geometry: LinearGeometry, hparams: Mapping[str, Any],
                     generator: torch.Generator) -> dict[str, torch.Tensor]:
        r, init, mode = hparams["r"], config.init_lora_weights, geometry.parallel_mode
        if mode in EMBEDDING_MODES:
            a, b = ecm.init_lora_embedding(geometry.in_features, geometry.out_features, r, init, generator)
            # A table's padding rows: no lookup reaches them, and DoRA's column norms must not count them.
            a[:, geometry.vocab_size or geometry.in_features:] = 0
            return {EMBEDDING_A: a, EMBEDDING_B: b}
        if geometry.conv is not None:
            a, b = ecm.init_lora_conv(geometry.out_features, geometry.in_features, geometry.conv, r, init, generator)
            return {LORA_A: a, LORA_B: b}
        a, b = lf.init_lora_factors(geometry.out_features, geometry.in_features, r, init, generator, torch.float64)
        return {LORA_A: a, LORA_B: b}

    def merged_delta(self, view: AdapterView) -> torch.Tensor:
        """s B_i A (column), s B A_i (row), s (B A_i)^T (a table's rows): this shard's update, no
        communication."""
        s, mode = view.hparams["scaling"], view.geometry.parallel_mode
        if mode in EMBEDDING_MODES:
            return ecm.lora_embedding_delta(view.tensors[EMBEDDING_A], view.tensors[EMBEDDING_B], s)
        if view.geometry.conv is not None:
            return ecm.lora_conv_delta(view.tensors[LORA_A], view.tensors[LORA_B], s)
        return lf.lora_delta(view.tensors[LORA_A], view.tensors[LORA_B], s)

    def describe(self, hparams: Mapping[str, Any]) -> str:
        return f"r={hparams['r']}"

    def accepts_stored(self, config: Mapping[str, Any]) -> bool:
        return not config.get("use_dora")

    def stored_hparams(self, config: Mapping[str, Any], module: str,
                       shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
        r = _check_pair(module, shapes)
        alpha = pattern_value(module, config.get("alpha_pattern") or {}, config.get("lora_alpha", 8))
        return {"r": r, "lora_alpha": alpha, "scaling": lora_scaling(alpha, r, bool(config.get("use_rslora")))}

    def peft_hparams(self, peft_config: Mapping[str, Any], module: str,
                     shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
        r = pattern_value(module, peft_config.get("rank_pattern") or {}, peft_config["r"])
        alpha = pattern_value(module, peft_config.get("alpha_pattern") or {}, peft_config.get("lora_alpha", 8))
        stored = (shapes.get(LORA_A) or shapes[EMBEDDING_A])[0]
        if stored != r:
            raise ValueError(f"{module}: the adapter's A has {stored} rows, adapter_config.json says r={r}")
        return {"r": r, "lora_alpha": alpha, "scaling": lora_scaling(alpha, r, bool(peft_config.get("use_rslora")))}

    def low_rank_factors(self, tensors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if EMBEDDING_A in tensors:
            return tensors[EMBEDDING_A], tensors[EMBEDDING_B]
        a, b = tensors[LORA_A], tensors[LORA_B]
        return a.flatten(1), b.flatten(1)  # conv kernels: [r, I*kh*kw], [O, r]

    def peft_config(self, config: Mapping[str, Any], modules: Mapping[str, Mapping[str, Any]],
                    target_modules: list[str], base_model_name_or_path: str | None) -> dict[str, Any]:
        """PEFT's LoraConfig fields: the most common r / lora_alpha, patterns for the exceptions."""
        return {
            "peft_type": self.peft_type, "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path or config.get("base_model_name_or_path"),
            **rank_fields(modules, "lora_alpha"), "target_modules": target_modules,
            "use_rslora": bool(config.get("use_rslora", False)),
            "lora_dropout": float(config.get("lora_dropout", 0.0)),
            "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
            "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
            "use_dora": bool(config.get("use_dora", False)), "revision": None,
        }

    def peft_key(self, tensor_name: str) -> str:
        return tensor_name if tensor_name in (EMBEDDING_A, EMBEDDING_B) else f"{tensor_name}.weight"

    def input_columns(self, view: AdapterView, x: torch.Tensor) -> torch.Tensor:
        """z = drop(x) A^T: [..., I] -> [..., r]."""
        return lf.lora_down(x, view.tensors[LORA_A], view.dropout)

    def local_addend(self, view: AdapterView, x: torch.Tensor, y: torch.Tensor,
                     columns: torch.Tensor | None) -> torch.Tensor:
        """y + s z B^T, z the input columns where the host carried them, else computed here
        (a lookup of A^T on tables, a conv on conv2d)."""
        g, s = view.geometry, view.hparams["scaling"]
        if g.parallel_mode in EMBEDDING_MODES:
            z = ecm.lora_embed_down(x, view.tensors[EMBEDDING_A], y.dtype, g.padding_idx)
            return lf.add_lora_up(y, z, view.tensors[EMBEDDING_B], s)
        if g.conv is not None:
            z = ecm.lora_conv_down(x, view.tensors[LORA_A], g.conv, view.dropout)
            return ecm.add_lora_conv_up(y, z, view.tensors[LORA_B], s)
        z = self.input_columns(view, x) if columns is None else columns
        return lf.add_lora_up(y, z, view.tensors[LORA_B], s)

    partial_addend = local_addend  # the row layer's partial takes the same addend, before its reduction


def _check_pair(module: str, shapes: Mapping[str, tuple[int, ...]]) -> int:
    """The rank of a stored module's factors: A and B both there, A's rows = B's columns."""
    a_name, b_name = (EMBEDDING_A, EMBEDDING_B) if EMBEDDING_A in shapes or EMBEDDING_B in shapes else (LORA_A, LORA_B)
    missing = [n for n in (a_name, b_name) if n not in shapes]
    if missing or len(shapes) != 2:
        raise ValueError(f"{module}: {', '.join(missing) or 'a mix of factors'} is missing "
                         f"(have {sorted(shapes)})")
    a, b = shapes[a_name], shapes[b_name]
    if len(a) < 2 or len(b) < 2 or a[0] != b[1]:
        raise ValueError(f"{module}: {a_name} {a} and {b_name} {b} do not share a rank")
    return a[0]


LORA = register_kind(LoRAKind())


def replace_factors(host, adapter_name: str, local_a: torch.Tensor, local_b: torch.Tensor,
                    r: int, alpha: float, scaling: float) -> None:
    """Swap in new factor SHARDS (possibly of another rank r) on `host`, e.g. from EVA."""
    hparams = {"r": r, "lora_alpha": alpha, "scaling": scaling}
    host.replace_tensors(adapter_name, {LORA_A: local_a, LORA_B: local_b}, hparams)
