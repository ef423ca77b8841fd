"""(IA)^3 (`IA3Config`) as an adapter kind: a learned vector l (PEFT's `ia3_l`) scales a module's
output, bias included (y = (x W^T + b) * l), or, on a feedforward module, its input
(y = (x * l) W^T + b).  Legend: I in, O out, t = TP size.  Per host:

    host        output scaling (l [O, 1])                 input scaling (l [1, I], feedforward)
    column      l_i like W's rows; output_scale on y_i    replicated; input_scale on the WHOLE input
                (complete gradient)                       (after the SP all-gather / copy_to): partial
                                                          gradient, summed by finalize_grads
    row         replicated; output_scale after the ONE    l_i like W's columns; input_scale on x_i
                reduction (gradient complete without SP,  (complete gradient)
                partial over the sequence slices with it)
    replicated  output_scale                              input_scale

Fused Megatron modules: only the parts `IA3Config.fused_parts` names are scaled (linear_qkv: q/k/v
per query group; linear_fc1: gate/up).  l then holds those rows only, in W's row order, and the
other rows keep scale 1 and train nothing; TP splits whole query groups (and each of gate/up), so
l_i is the targeted rows of W_i and no collective is needed.

Merging is exact: W' = W * l (rows or columns), and with output scaling b' = b * l (PEFT's rule);
unmerging restores the saved copies.  Export: a fused module's vector is split into the HF
modules it covers (linear_qkv with k, v: k_proj and v_proj; q_proj gets no adapter, as in PEFT's
default); an input-scaling vector on linear_fc1 goes to gate_proj and up_proj alike.
"""
from __future__ import annotations

import re
from types import MappingProxyType
from typing import Any, Mapping

import torch

from parallel_adapters.adapters.kinds import register_kind
from parallel_adapters.adapters.kinds.protocol import (
    INPUT_SCALE, OUTPUT_SCALE, AdapterKind, AdapterSettings, AdapterView, ReductionPayload, TensorDecl,
)
from parallel_adapters.config import IA3_FUSED_PARTS, IA3Config
from parallel_adapters.distributed.geometry import LINEAR_MODES, LinearGeometry
from parallel_adapters.distributed.sharding import REPLICATED, ShardSpec

IA3_L = "ia3_l"  # `<module>.ia3_l.<adapter>.weight`; PEFT: `<module>.ia3_l` (a ParameterDict)


def fused_row_mask(geometry: LinearGeometry, parts: tuple[str, ...] | None) -> torch.Tensor:
    """Which of the global output rows are scaled (bool [O]); `parts` None: all of them."""
    out = geometry.out_features
    if parts is None:
        return torch.ones(out, dtype=torch.bool)
    if set(parts) <= set(IA3_FUSED_PARTS["linear_fc1"]):  # [gate; up], each half split over TP
        half = out // 2
        return torch.tensor([p in parts for p in ("gate", "up") for _ in range(half)])
    heads, groups, size = geometry.attention
    per_group = [("q", heads // groups * size), ("k", size), ("v", size)]
    return torch.tensor([p in parts for _ in range(groups) for p, n in per_group for _ in range(n)])


def local_rows(geometry: LinearGeometry, parts: tuple[str, ...] | None) -> torch.Tensor:
    """Indices, within this rank's W_i rows, of the scaled rows (ascending)."""
    mask = ShardSpec(0, geometry.chunks).shard(fused_row_mask(geometry, parts), geometry.tp_rank, geometry.tp_size)
    return mask.nonzero().flatten()


class IA3Kind(AdapterKind):
    name = "ia3"
    config_class = IA3Config
    peft_type = "IA3"
    hyperparameters = ("ia3_feedforward", "ia3_parts")
    slot_table = MappingProxyType({mode: frozenset({OUTPUT_SCALE, INPUT_SCALE}) for mode in LINEAR_MODES})
    tensor_axes = MappingProxyType({IA3_L: (0, None)})  # output scaling; `axes` says per module

    def settings(self, config: IA3Config, module_name: str, geometry: LinearGeometry) -> AdapterSettings:
        if geometry.parallel_mode not in LINEAR_MODES:
            raise ValueError(f"module {module_name}: IA3 is implemented for linear layers only "
                             f"(this is a {geometry.parallel_mode!r} layer); exclude it with exclude_modules")
        feedforward = is_feedforward(module_name, config.feedforward_modules)
        leaf = module_name.rsplit(".", 1)[-1]
        parts = None if feedforward else config.fused_parts.get(leaf)
        if parts is not None and parts == IA3_FUSED_PARTS[leaf]:
            parts = None  # every row
        if parts is not None:
            _check_fused(module_name, leaf, geometry)
        return AdapterSettings({"ia3_feedforward": feedforward, "ia3_parts": parts}, 0.0, config.seed)

    def tensors(self, geometry: LinearGeometry, hparams: Mapping[str, Any]) -> tuple[TensorDecl, ...]:
        mode = geometry.parallel_mode
        if hparams["ia3_feedforward"]:
            spec = ShardSpec(dim=1) if mode == "row" else REPLICATED
            return (TensorDecl(IA3_L, (1, geometry.in_features), spec),)
        rows = int(fused_row_mask(geometry, hparams["ia3_parts"]).sum())
        chunks = geometry.chunks if hparams["ia3_parts"] is None else 1
        spec = ShardSpec(dim=0, chunks=chunks) if mode == "column" else REPLICATED
        partial = geometry.sequence_parallel if mode == "row" else None  # y is whole on a row host without SP
        return (TensorDecl(IA3_L, (rows, 1), spec, partial_grad=partial),)

    def full_tensors(self, config: IA3Config, geometry: LinearGeometry, hparams: Mapping[str, Any],
                     generator: torch.Generator) -> dict[str, torch.Tensor]:
        shape = self.tensors(geometry, hparams)[0].global_shape
        if config.init_ia3_weights:
            return {IA3_L: torch.ones(shape, dtype=torch.float64)}
        return {IA3_L: torch.randn(shape, generator=generator, dtype=torch.float64)}

    def describe(self, hparams: Mapping[str, Any]) -> str:
        where = "input" if hparams["ia3_feedforward"] else "output"
        return where + (f" {'/'.join(hparams['ia3_parts'])}" if hparams["ia3_parts"] else "")

    def peft_key(self, tensor_name: str) -> str:
        return tensor_name

    # -- offline: checkpoints and PEFT files ---------------------------------------------------

    def axes(self, tensor_name: str, embedding: bool,
             hparams: Mapping[str, Any] | None = None) -> tuple[int | None, int | None]:
        return (None, 1) if hparams["ia3_feedforward"] else (0, None)  # [1, I] / [O, 1]

    def hf_parts(self, hparams: Mapping[str, Any]) -> tuple[str, ...] | None:
        parts = hparams["ia3_parts"]
        return None if parts is None else tuple(f"{p}_proj" for p in parts)

    def hf_module_hparams(self, hparams: Mapping[str, Any]) -> dict[str, Any]:
        return {**hparams, "ia3_parts": None}  # an HF module's vector covers all its rows

    def stored_hparams(self, config: Mapping[str, Any], module: str,
                       shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
        feedforward = is_feedforward(module, _targets(config.get("feedforward_modules")))
        leaf = module.rsplit(".", 1)[-1]
        parts = None if feedforward else (config.get("fused_parts") or {}).get(leaf)
        parts = None if parts is None or tuple(parts) == IA3_FUSED_PARTS[leaf] else tuple(parts)
        _check_orientation(module, shapes, feedforward)
        return {"ia3_feedforward": feedforward, "ia3_parts": parts}

    def peft_hparams(self, peft_config: Mapping[str, Any], module: str,
                     shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
        """PEFT's rule for feedforward_modules: a regex (full match) or any name the module's ends with."""
        patterns = peft_config.get("feedforward_modules")
        if isinstance(patterns, str):
            feedforward = re.fullmatch(patterns, module) is not None
        else:
            feedforward = any(module.endswith(p) for p in patterns or ())
        _check_orientation(module, shapes, feedforward)
        return {"ia3_feedforward": feedforward, "ia3_parts": None}

    def peft_config(self, config: Mapping[str, Any], modules: Mapping[str, Mapping[str, Any]],
                    target_modules: list[str], base_model_name_or_path: str | None) -> dict[str, Any]:
        """PEFT's IA3Config fields; feedforward_modules in target_modules' own terms (types or paths)."""
        feedforward = []
        for target in target_modules:
            flags = {h["ia3_feedforward"] for m, h in modules.items() if m == target or m.endswith("." + target)}
            if len(flags) > 1:
                raise ValueError(f"IA3 export: the {target} modules are feedforward in some layers and not in others; "
                                 "PEFT's feedforward_modules names types or paths as target_modules does")
            if flags == {True}:
                feedforward.append(target)
        return {
            "peft_type": self.peft_type, "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path or config.get("base_model_name_or_path"),
            "target_modules": target_modules, "feedforward_modules": feedforward, "exclude_modules": None,
            "fan_in_fan_out": False, "init_ia3_weights": True, "modules_to_save": None, "inference_mode": True,
            "revision": None,
        }

    # -- merge ---------------------------------------------------------------------------------

    def merged_weight(self, view: AdapterView, weight: torch.Tensor) -> torch.Tensor:
        return (weight.to(torch.float64) * self._weight_factor(view)).to(weight.dtype)

    def merged_delta(self, view: AdapterView) -> torch.Tensor:
        return view.weight.to(torch.float64) * (self._weight_factor(view) - 1)

    def merged_bias(self, view: AdapterView, bias: torch.Tensor) -> torch.Tensor:
        if view.hparams["ia3_feedforward"]:
            return bias
        return (bias.to(torch.float64) * self._output_factor(view, torch.float64)).to(bias.dtype)

    # -- slots ---------------------------------------------------------------------------------

    def input_scale(self, view: AdapterView, x: torch.Tensor) -> torch.Tensor:
        if not view.hparams["ia3_feedforward"]:
            return x
        return x * view.tensors[IA3_L].flatten().to(x.dtype)

    def output_scale(self, view: AdapterView, x: torch.Tensor, y: torch.Tensor,
                     reduced: ReductionPayload | None) -> torch.Tensor:
        """(y + b) l - b: the host adds b afterwards (or hands it back with skip_bias_add)."""
        if view.hparams["ia3_feedforward"]:
            return y
        f = self._output_factor(view, y.dtype)
        return y * f if view.bias is None else y * f + view.bias.to(y.dtype) * (f - 1)

    # -- internals -----------------------------------------------------------------------------

    def _output_factor(self, view: AdapterView, dtype: torch.dtype) -> torch.Tensor:
        """This rank's per-output-row scale: l where scaled, 1 elsewhere (differentiable in l)."""
        l_local = view.tensors[IA3_L].flatten().to(dtype)
        parts = view.hparams["ia3_parts"]
        if parts is None:
            return l_local
        g = view.geometry
        rows = g.out_features // g.tp_size if g.parallel_mode == "column" else g.out_features
        index = local_rows(g, parts) if g.parallel_mode == "column" else fused_row_mask(g, parts).nonzero().flatten()
        return torch.ones(rows, dtype=dtype, device=l_local.device).index_copy(0, index.to(l_local.device), l_local)

    def _weight_factor(self, view: AdapterView) -> torch.Tensor:
        """The factor W_i is multiplied by: [O_i, 1] (output) or [1, I_i] (input)."""
        if view.hparams["ia3_feedforward"]:
            return view.tensors[IA3_L].to(torch.float64)
        return self._output_factor(view, torch.float64).unsqueeze(1)


def is_feedforward(module_name: str, patterns: Any) -> bool:
    """PEFT's rule: a str is a regex matching the whole name; a list entry matches the name or a
    '.'-suffix of it (as target_modules)."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, module_name) is not None
    return any(module_name == p or module_name.endswith("." + p) for p in patterns)


def _targets(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _check_orientation(module: str, shapes: Mapping[str, tuple[int, ...]], feedforward: bool) -> None:
    shape = shapes.get(IA3_L)
    if shape is None or len(shapes) != 1:
        raise ValueError(f"{module}: an IA3 adapter has exactly {IA3_L} (have {sorted(shapes)})")
    if len(shape) != 2 or shape[1 if not feedforward else 0] != 1:
        want = "[1, in] (input scaling, feedforward)" if feedforward else "[out, 1] (output scaling)"
        raise ValueError(f"{module}: {IA3_L} has shape {shape}, expected {want}")


def _check_fused(module_name: str, leaf: str, geometry: LinearGeometry) -> None:
    if leaf == "linear_qkv" and geometry.attention is None:
        raise ValueError(f"module {module_name}: IA3Config.fused_parts needs the attention layout (heads, query "
                         "groups, head size) of a Megatron linear_qkv; this layer carries none")
    if leaf == "linear_fc1" and geometry.chunks != 2:
        raise ValueError(f"module {module_name}: IA3Config.fused_parts['linear_fc1'] names gate/up, but this "
                         "linear_fc1 is not gated (no SwiGLU halves)")


IA3 = register_kind(IA3Kind())
