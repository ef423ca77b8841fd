"""Adapters under Hugging Face names, for any registered kind: the shared core of the PEFT export
(export.py) and the offline merge (merge.py).  Offline: no megatron, no process group.

A checkpoint stores each adapter tensor whole under its Megatron module, `<module>.<tensor>.<adapter>.weight`.
One Megatron module may be several HF modules (linear_qkv -> q/k/v_proj, linear_fc1 ->
gate/up_proj), and the vocabulary modules carry padding rows.  The kind says, per tensor name, which
axis runs along the base weight's rows and which along its columns (`AdapterKind.tensor_axes`):

    row axis      split into the HF modules' rows (hf.mapping.row_segments: q/k/v per query group,
                  [gate; up]); vocabulary padding dropped
    column axis   checked against the HF weight's columns
    neither       the same tensor for every HF module (LoRA's A on q/k/v: one tensor, written thrice)

Nothing is copied where it need not be: row splits are views where the rows are contiguous.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from parallel_adapters.adapters.kinds import AdapterKind, kind_for_stored_config
from parallel_adapters.adapters.kinds.protocol import AdapterView
from parallel_adapters.adapters.pretrained import PEFT_PREFIX
from parallel_adapters.distributed.geometry import LinearGeometry
from parallel_adapters.hf.config import LlamaShape
from parallel_adapters.hf.mapping import (
    HF_LINEAR_NAMES, expected_hf_shapes, expected_rows, hf_modules, row_segments, split_rows,
)

EMBEDDING_MODULE = "embedding.word_embeddings"
_VOCAB_MODULES = {EMBEDDING_MODULE: "model.embed_tokens", "output_layer": "lm_head"}


@dataclass(frozen=True)
class HFModuleAdapter:
    """One HF module's adapter: the kind's tensors (by the kind's names) and hyperparameters."""

    kind: AdapterKind
    tensors: dict[str, torch.Tensor]
    hparams: dict[str, Any]
    embedding: bool = False
    """A lookup table (the weight is [vocab, width], not [out, in])."""

    def peft_tensors(self, hf_module: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The entries of PEFT's adapter_model.safetensors for this module."""
        return {f"{PEFT_PREFIX}{hf_module}.{self.kind.peft_key(n)}": t.detach().to(dtype or t.dtype)
                for n, t in self.tensors.items()}

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The HF weight with this adapter folded in (the kind's own merge rule)."""
        out_features, in_features = (weight.shape[1], weight.shape[0]) if self.embedding else weight.shape[:2]
        geometry = LinearGeometry("embedding" if self.embedding else "replicated", in_features, out_features,
                                  1, None, 1, 0, False, False, True, False)
        view = AdapterView("merge", self.kind, frozenset(), self.tensors, self.hparams, None, geometry, weight)
        return self.kind.merged_weight(view, weight)

    def merged_bias(self, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """The HF bias with this adapter folded in (IA3 scales it; most kinds leave it)."""
        geometry = LinearGeometry("replicated", weight.shape[1], weight.shape[0], 1, None, 1, 0, False, False, True,
                                  False)
        view = AdapterView("merge", self.kind, frozenset(), self.tensors, self.hparams, None, geometry, weight,
                           bias=bias)
        return self.kind.merged_bias(view, bias)


@dataclass(frozen=True)
class ModulePlan:
    """How one Megatron module's adapter becomes its HF modules' adapters (names and shapes only)."""

    module: str
    kind: AdapterKind
    keys: dict[str, str]
    """The kind's tensor name -> the key of the full tensor in the source."""
    hparams: dict[str, Any]
    hf_modules: tuple[str, ...]
    segments: tuple
    """Row segments (hf.mapping.Segment) of the row-axis tensors; HF module names without suffix."""

    def hf_adapters(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, HFModuleAdapter]:
        """HF module -> its adapter, from this module's full tensors (by the kind's names)."""
        parts: dict[str, dict[str, torch.Tensor]] = {hf: {} for hf in self.hf_modules}
        for name, tensor in tensors.items():
            row_axis = self.kind.axes(name, self.module == EMBEDDING_MODULE, self.hparams)[0]
            if row_axis is None:
                for hf in self.hf_modules:
                    parts[hf][name] = tensor.detach()
                continue
            rows = split_rows(self.segments, tensor.detach().movedim(row_axis, 0), copy=False)
            for hf in self.hf_modules:
                parts[hf][name] = rows[hf].movedim(0, row_axis)
        embedding = self.module == EMBEDDING_MODULE
        hparams = self.kind.hf_module_hparams(self.hparams)
        return {hf: HFModuleAdapter(self.kind, parts[hf], hparams, embedding) for hf in self.hf_modules}


def adapter_hf_modules(module: str, shape: LlamaShape) -> tuple[str, ...]:
    """HF module path(s) an adapter on Megatron `module` exports to.  The output layer is always
    `lm_head`: with tied embeddings PEFT still adapts lm_head's projection alone.  A routed expert's
    are its saved per-expert modules (the merge's targets; the PEFT export packs them into the fused
    parameters instead, checkpoint/expert_adapter.py)."""
    if module in _VOCAB_MODULES:
        return (_VOCAB_MODULES[module],)
    if module.rsplit(".", 1)[-1] not in HF_LINEAR_NAMES:
        raise ValueError(f"PEFT export supports adapters on {sorted(HF_LINEAR_NAMES)}, word_embeddings and "
                         "output_layer only")
    return hf_modules(module, shape)


def _hf_columns(hf_module: str, shape: LlamaShape) -> int:
    if hf_module in _VOCAB_MODULES.values():
        return shape.hidden_size  # both tables are [vocab, hidden]
    return expected_hf_shapes(shape)[hf_module + ".weight"][1]


def group_tensors(names: list[str], kind: AdapterKind, adapter_name: str | None = None) -> dict[str, dict[str, str]]:
    """Megatron module -> {the kind's tensor name: key}, for one adapter; ValueError for a key that
    is none of the kind's tensors, for several adapters without `adapter_name`, or for none."""
    pattern = re.compile(rf"^(?P<module>.+)\.(?P<tensor>{'|'.join(map(re.escape, kind.tensor_axes))})"
                         rf"(?:\.(?P<adapter>[^.]+))?\.weight$")
    found: dict[str, dict[str, str]] = {}
    adapters = set()
    for key in names:
        m = pattern.match(key)
        if m is None:
            raise ValueError(f"cannot export {key!r}: not a tensor of a {kind.name} adapter "
                             f"({', '.join(kind.tensor_axes)})")
        adapter = m.group("adapter") or "default"
        adapters.add(adapter)
        if adapter_name is None or adapter == adapter_name:
            found.setdefault(m.group("module"), {})[m.group("tensor")] = key
    if adapter_name is None and len(adapters) > 1:
        raise ValueError(f"the tensors hold adapters {sorted(adapters)}: pass adapter_name")
    if not found:
        raise ValueError(f"no tensors of adapter {adapter_name!r} (have {sorted(adapters)})")
    return dict(sorted(found.items()))


def plan_modules(tensors: Mapping[str, torch.Tensor], adapter_config: Mapping[str, Any],
                 hf_config: Mapping[str, Any], adapter_name: str | None = None) -> list[ModulePlan]:
    """The per-module plan from the tensors' names and shapes alone (meta tensors will do), checked
    against the HF config: ValueError naming the module and tensor for a shape that does not fit."""
    shape = LlamaShape.from_config(hf_config, "hf_config")
    kind = kind_for_stored_config(adapter_config)
    plans = []
    for module, keys in group_tensors(list(tensors), kind, adapter_name).items():
        try:
            targets = adapter_hf_modules(module, shape)
        except ValueError as exc:
            raise ValueError(f"cannot export the adapter on {module!r}: {exc}") from None
        shapes = {name: tuple(tensors[key].shape) for name, key in keys.items()}
        hparams = kind.stored_hparams(adapter_config, module, shapes)
        parts = kind.hf_parts(hparams)
        if parts is not None:
            targets = tuple(t for t in targets if t.rsplit(".", 1)[-1] in parts)
        segments: tuple = ()
        for name, dims in shapes.items():
            row_axis, col_axis = kind.axes(name, module == EMBEDDING_MODULE, hparams)
            if row_axis is not None:
                vocab_shape = dataclasses.replace(shape, tie_word_embeddings=False)  # lm_head rows, tied or not
                segments = (tuple(row_segments(module, vocab_shape, dims[row_axis], "")) if parts is None
                            else _covered_segments(module, shape, parts, dims[row_axis]))
            if col_axis is not None and dims[col_axis] != _hf_columns(targets[0], shape):
                raise ValueError(f"{module}: {name} has {dims[col_axis]} along the weight's columns, the HF config "
                                 f"implies {_hf_columns(targets[0], shape)}")
        plans.append(ModulePlan(module, kind, keys, hparams, targets, segments))
    return plans


def _covered_segments(module: str, shape: LlamaShape, parts: tuple[str, ...], rows: int) -> tuple:
    """The row segments of a tensor holding only the rows of HF modules `parts` (in W's row order)."""
    kept, start = [], 0
    for seg in row_segments(module, shape, expected_rows(module, shape), ""):
        if seg.hf_name is not None and seg.hf_name.rsplit(".", 1)[-1] in parts:
            kept.append(dataclasses.replace(seg, start=start, stop=start + seg.stop - seg.start))
            start += seg.stop - seg.start
    if start != rows:
        raise ValueError(f"{module}: {rows} rows, the HF config implies {start} for {', '.join(parts)}")
    return tuple(kept)


def hf_module_adapters(tensors: Mapping[str, torch.Tensor], adapter_config: Mapping[str, Any],
                       hf_config: Mapping[str, Any], adapter_name: str | None = None) -> dict[str, HFModuleAdapter]:
    """HF module path -> its adapter, from full tensors under Megatron names."""
    out: dict[str, HFModuleAdapter] = {}
    for plan in plan_modules(tensors, adapter_config, hf_config, adapter_name):
        out.update(plan.hf_adapters({name: tensors[key] for name, key in plan.keys.items()}))
    return out


def target_modules(adapters: Mapping[str, Any], shape: LlamaShape) -> list[str]:
    """PEFT's target_modules: module types where every layer has one (["q_proj", ...]), else the
    full paths; embed_tokens / lm_head by name."""
    layer_modules = [m for m in adapters if m.startswith("model.layers.")]
    types = sorted({m.rsplit(".", 1)[-1] for m in layer_modules})
    complete = all(f"model.layers.{n}.{'self_attn' if t in ('q_proj', 'k_proj', 'v_proj', 'o_proj') else 'mlp'}.{t}"
                   in adapters for n in range(shape.num_layers) for t in types)
    others = sorted(m.rsplit(".", 1)[-1] for m in adapters if not m.startswith("model.layers."))
    return (types if complete else sorted(layer_modules)) + others
