"""The nn.Conv2d forms of LoRA (ALF's layout), IA3, LoHa and LoKr: per-module variants of those kinds
(`kinds.register_variant`), picked when the wrapped module is a Conv2d (ALF: and
`LoraConfig.conv_layout="alf"`).  They keep their kind's name and config, so checkpoints and
PEFT files name the kind as usual; the math is in `adapters/conv_math.py`.  A conv2d host is never
TP-split: every tensor is whole (replicated over a group of one), and no slot communicates.

    variant            tensors (PEFT's names and shapes; Ig = I / groups)          slot
    LoRA, ALF layout   alf_A [r, Ig kw], alf_B [O kh, r]  (full: alf_A [O kh, Ig kw])  local_addend
    IA3                ia3_l [1, O, 1, 1] (output) / [1, I, 1, 1] (feedforward: input)  output_scale /
                                                                                    input_scale
    LoHa               hada_w1_a .. hada_w2_b (flat), + hada_t1, hada_t2 (effective)  weight_delta
    LoKr               lokr_w1 (_a, _b), lokr_w2 or lokr_w2_a/_b (+ lokr_t2)        weight_delta

PEFT turns `use_effective_conv2d` off for a 1x1 kernel; so do these.  ALF's adapter has no PEFT
form (save_pretrained / export refuse it; save_checkpoint keeps it).
"""
from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any, Mapping

import torch

from parallel_adapters.adapters import conv_math as cm
from parallel_adapters.adapters.kinds import register_variant
from parallel_adapters.adapters.kinds import ia3, loha, lokr
from parallel_adapters.adapters.kinds.lora import LoRAKind
from parallel_adapters.adapters.kinds.protocol import (
    INPUT_SCALE, LOCAL_ADDEND, OUTPUT_SCALE, WEIGHT_DELTA, AdapterSettings, AdapterView, ReductionPayload, TensorDecl,
)
from parallel_adapters.config import LoraConfig, pattern_value
from parallel_adapters.distributed.geometry import LinearGeometry
from parallel_adapters.distributed.sharding import REPLICATED

ALF_A, ALF_B = "alf_A", "alf_B"
HADA_T1, HADA_T2, LOKR_T2 = "hada_t1", "hada_t2", "lokr_t2"


def weight_shape(geometry: LinearGeometry) -> tuple[int, int, int, int]:
    """The conv's W: [O, Ig, kh, kw]."""
    conv = geometry.conv
    return (geometry.out_features, geometry.in_features // conv.groups, *conv.kernel_size)


def _effective(config: Any, geometry: LinearGeometry) -> bool:
    """PEFT's rule: the Tucker form only for a kernel other than 1x1."""
    return bool(config.use_effective_conv2d) and tuple(geometry.conv.kernel_size) != (1, 1)


def _as_linear(geometry: LinearGeometry) -> LinearGeometry:
    """The conv as the [O, Ig] linear layer its kind's settings understand (r, alpha, factorisation)."""
    return dataclasses.replace(geometry, parallel_mode="replicated", in_features=weight_shape(geometry)[1], conv=None)


def _decls(*pairs: tuple[str, tuple[int, ...]]) -> tuple[TensorDecl, ...]:
    return tuple(TensorDecl(name, shape, REPLICATED) for name, shape in pairs)


class AlfConvKind(LoRAKind):
    """LoRA on nn.Conv2d in ALF's balanced layout (`LoraConfig.conv_layout="alf"`): lora_alpha is
    ALF's `weight`; s = lora_alpha / r, or lora_alpha when ALF keeps one full matrix."""

    hyperparameters = ("r", "lora_alpha", "scaling", "alf_low_rank")
    slot_table = MappingProxyType({"conv2d": frozenset({LOCAL_ADDEND})})
    tensor_axes = MappingProxyType({ALF_A: (None, None), ALF_B: (None, None)})

    def accepts_module(self, config: Any, geometry: LinearGeometry) -> bool:
        return geometry.conv is not None and config.conv_layout == "alf"

    def settings(self, config: LoraConfig, module_name: str, geometry: LinearGeometry) -> AdapterSettings:
        for field, bad in (("use_rslora", config.use_rslora),
                           ("init_lora_weights", config.init_lora_weights not in (True, False))):
            if bad:
                raise ValueError(f"module {module_name}: LoraConfig.{field}={getattr(config, field)!r} does not apply "
                                 "to ALF's conv layout (conv_layout='alf': s = lora_alpha / r, ALF's init or random)")
        r = pattern_value(module_name, config.rank_pattern, config.r)
        alpha = pattern_value(module_name, config.alpha_pattern, config.lora_alpha)
        nrows, ncols = cm.alf_matrix(geometry.out_features, weight_shape(geometry)[1], geometry.conv)
        low = cm.alf_low_rank(r, nrows, ncols)
        hparams = {"r": r, "lora_alpha": alpha, "scaling": alpha / r if low else float(alpha), "alf_low_rank": low}
        return AdapterSettings(hparams, config.lora_dropout, config.seed)

    def tensors(self, geometry: LinearGeometry, hparams: Mapping[str, Any]) -> tuple[TensorDecl, ...]:
        r = hparams["r"]
        nrows, ncols = cm.alf_matrix(geometry.out_features, weight_shape(geometry)[1], geometry.conv)
        if not hparams["alf_low_rank"]:
            return _decls((ALF_A, (nrows, ncols)))
        return _decls((ALF_A, (r, ncols)), (ALF_B, (nrows, r)))

    def full_tensors(self, config: LoraConfig, geometry: LinearGeometry, hparams: Mapping[str, Any],
                     generator: torch.Generator) -> dict[str, torch.Tensor]:
        """ALF's init: A Xavier-uniform, B zero (full matrix: zero); init_lora_weights=False: all random."""
        decls = self.tensors(geometry, hparams)
        full = {d.name: cm.xavier_uniform(d.global_shape, generator) for d in decls}
        if config.init_lora_weights is True:
            full[ALF_B if ALF_B in full else ALF_A].zero_()
        return full

    def merged_delta(self, view: AdapterView) -> torch.Tensor:
        t = view.tensors
        return cm.alf_delta(t[ALF_A], t.get(ALF_B), weight_shape(view.geometry), view.hparams["scaling"])

    def local_addend(self, view: AdapterView, x: torch.Tensor, y: torch.Tensor,
                     columns: torch.Tensor | None) -> torch.Tensor:
        t, g = view.tensors, view.geometry
        return y + cm.alf_addend(x, t[ALF_A], t.get(ALF_B), weight_shape(g), g.conv, view.hparams["scaling"],
                                 view.dropout)

    def describe(self, hparams: Mapping[str, Any]) -> str:
        return f"r={hparams['r']}, ALF conv layout" + ("" if hparams["alf_low_rank"] else " (full matrix)")

    def low_rank_factors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        return None

    def peft_key(self, tensor_name: str) -> str:
        raise ValueError("LoRA in ALF's conv layout (LoraConfig.conv_layout='alf') has no PEFT form; keep it with "
                         "save_checkpoint / load_checkpoint, or merge it")


class IA3ConvKind(ia3.IA3Kind):
    """PEFT's IA3 Conv2d: ia3_l [1, C, 1, 1] scales the output channels (bias included) or, on a
    feedforward module, the input channels."""

    slot_table = MappingProxyType({"conv2d": frozenset({OUTPUT_SCALE, INPUT_SCALE})})

    def accepts_module(self, config: Any, geometry: LinearGeometry) -> bool:
        return geometry.conv is not None

    def settings(self, config: Any, module_name: str, geometry: LinearGeometry) -> AdapterSettings:
        feedforward = ia3.is_feedforward(module_name, config.feedforward_modules)
        return AdapterSettings({"ia3_feedforward": feedforward, "ia3_parts": None}, 0.0, config.seed)

    def tensors(self, geometry: LinearGeometry, hparams: Mapping[str, Any]) -> tuple[TensorDecl, ...]:
        channels = geometry.in_features if hparams["ia3_feedforward"] else geometry.out_features
        return _decls((ia3.IA3_L, (1, channels, 1, 1)))

    def input_scale(self, view: AdapterView, x: torch.Tensor) -> torch.Tensor:
        if not view.hparams["ia3_feedforward"]:
            return x
        return x * cm.channel_view(view.tensors[ia3.IA3_L], x.dtype)

    def output_scale(self, view: AdapterView, x: torch.Tensor, y: torch.Tensor,
                     reduced: ReductionPayload | None) -> torch.Tensor:
        """(y + b) l - b per output channel: the host adds b afterwards."""
        if view.hparams["ia3_feedforward"]:
            return y
        f = cm.channel_view(view.tensors[ia3.IA3_L], y.dtype)
        return y * f if view.bias is None else y * f + cm.channel_view(view.bias, y.dtype) * (f - 1)

    def _weight_factor(self, view: AdapterView) -> torch.Tensor:
        l_vec = view.tensors[ia3.IA3_L].to(torch.float64)
        if view.hparams["ia3_feedforward"]:
            return cm.ia3_input_factor(l_vec, view.geometry.out_features, view.geometry.conv.groups)
        return l_vec.reshape(-1, 1, 1, 1)


class LoHaConvKind(loha.LoHaKind):
    """PEFT's LoHa Conv2d: flat factors over Ig kh kw columns, or the Tucker form (effective)."""

    hyperparameters = loha.LoHaKind.hyperparameters + ("loha_effective_conv2d",)
    slot_table = MappingProxyType({"conv2d": frozenset({WEIGHT_DELTA})})
    tensor_axes = MappingProxyType({**loha.LoHaKind.tensor_axes, HADA_T1: (None, None), HADA_T2: (None, None)})

    def accepts_module(self, config: Any, geometry: LinearGeometry) -> bool:
        return geometry.conv is not None

    def settings(self, config: Any, module_name: str, geometry: LinearGeometry) -> AdapterSettings:
        linear = super().settings(config, module_name, _as_linear(geometry))
        return dataclasses.replace(linear, hparams={**linear.hparams,
                                                    "loha_effective_conv2d": _effective(config, geometry)})

    def tensors(self, geometry: LinearGeometry, hparams: Mapping[str, Any]) -> tuple[TensorDecl, ...]:
        r, (out, in_g, kh, kw) = hparams["r"], weight_shape(geometry)
        if hparams["loha_effective_conv2d"]:
            return _decls((loha.W1A, (r, out)), (loha.W1B, (r, in_g)), (loha.W2A, (r, out)), (loha.W2B, (r, in_g)),
                          (HADA_T1, (r, r, kh, kw)), (HADA_T2, (r, r, kh, kw)))
        cols = in_g * kh * kw
        return _decls((loha.W1A, (out, r)), (loha.W1B, (r, cols)), (loha.W2A, (out, r)), (loha.W2B, (r, cols)))

    def full_tensors(self, config: Any, geometry: LinearGeometry, hparams: Mapping[str, Any],
                     generator: torch.Generator) -> dict[str, torch.Tensor]:
        """PEFT's init: all Kaiming-uniform, w2b zero unless init_weights=False."""
        full = {d.name: cm.kaiming_uniform(d.global_shape, generator) for d in self.tensors(geometry, hparams)}
        if config.init_weights:
            full[loha.W2B].zero_()
        return full

    def merged_delta(self, view: AdapterView) -> torch.Tensor:
        names = ((HADA_T1, loha.W1A, loha.W1B, HADA_T2, loha.W2A, loha.W2B) if view.hparams["loha_effective_conv2d"]
                 else (loha.W1A, loha.W1B, loha.W2A, loha.W2B))
        return cm.loha_conv_delta(view.tensors, names, weight_shape(view.geometry), view.hparams["scaling"])


class LoKrConvKind(lokr.LoKrKind):
    """PEFT's LoKr Conv2d: w1 kron w2 over (O, Ig), w2 carrying the kernel (whole or Tucker) or
    flat over i2 kh kw columns."""

    hyperparameters = lokr.LoKrKind.hyperparameters + ("lokr_effective_conv2d",)
    slot_table = MappingProxyType({"conv2d": frozenset({WEIGHT_DELTA})})
    tensor_axes = MappingProxyType({**lokr.LoKrKind.tensor_axes, LOKR_T2: (None, None)})

    def accepts_module(self, config: Any, geometry: LinearGeometry) -> bool:
        return geometry.conv is not None

    def settings(self, config: Any, module_name: str, geometry: LinearGeometry) -> AdapterSettings:
        linear = super().settings(config, module_name, _as_linear(geometry))  # PEFT factorises O and Ig
        return dataclasses.replace(linear, hparams={**linear.hparams,
                                                    "lokr_effective_conv2d": _effective(config, geometry)})

    def tensors(self, geometry: LinearGeometry, hparams: Mapping[str, Any]) -> tuple[TensorDecl, ...]:
        r, (_, _, kh, kw) = hparams["r"], weight_shape(geometry)
        o1, o2, i1, i2 = hparams["lokr_factors"]
        first = (((lokr.W1, (o1, i1)),) if hparams["lokr_w1_whole"]
                 else ((lokr.W1A, (o1, r)), (lokr.W1B, (r, i1))))
        if hparams["lokr_w2_whole"]:
            second = ((lokr.W2, (o2, i2, kh, kw)),)
        elif hparams["lokr_effective_conv2d"]:
            second = ((lokr.W2A, (r, o2)), (lokr.W2B, (r, i2)), (LOKR_T2, (r, r, kh, kw)))
        else:
            second = ((lokr.W2A, (o2, r)), (lokr.W2B, (r, i2 * kh * kw)))
        return _decls(*first, *second)

    def full_tensors(self, config: Any, geometry: LinearGeometry, hparams: Mapping[str, Any],
                     generator: torch.Generator) -> dict[str, torch.Tensor]:
        """PEFT's init: Kaiming-uniform, then w1 (or w1_a) zero (True) or w2 (or w2_b) zero ("lycoris")."""
        full = {d.name: cm.kaiming_uniform(d.global_shape, generator) for d in self.tensors(geometry, hparams)}
        if config.init_weights is True:
            full[lokr.W1 if lokr.W1 in full else lokr.W1A].zero_()
        elif config.init_weights == "lycoris":
            full[lokr.W2 if lokr.W2 in full else lokr.W2B].zero_()
        return full

    def merged_delta(self, view: AdapterView) -> torch.Tensor:
        t = view.tensors
        w1 = t[lokr.W1] if lokr.W1 in t else t[lokr.W1A] @ t[lokr.W1B]
        if lokr.W2 in t:
            w2 = t[lokr.W2]
        elif LOKR_T2 in t:
            w2 = cm.tucker(t[LOKR_T2], t[lokr.W2A], t[lokr.W2B])
        else:
            w2 = t[lokr.W2A] @ t[lokr.W2B]
        return cm.lokr_conv_delta(w1, w2, weight_shape(view.geometry), view.hparams["scaling"])


ALF_CONV = register_variant(AlfConvKind())
IA3_CONV = register_variant(IA3ConvKind())
LOHA_CONV = register_variant(LoHaConvKind())
LOKR_CONV = register_variant(LoKrConvKind())
