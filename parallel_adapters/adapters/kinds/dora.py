"""DoRA (weight-decomposed LoRA, `LoraConfig(use_dora=True)`) as an adapter kind: LoRA's A and B
plus a trainable magnitude m [O] (PEFT's `lora_magnitude_vector`), initialised to the row norms
of W + s B A:

    eval, or dropout 0:   y = f (x W^T + s (x A^T) B^T) + b,          f = m / ||W + s B A||_row
    training, dropout p:  y = x W^T + b + (f - 1) drop(x) W^T + f s (drop(x) A^T) B^T   (as PEFT)

The norm is detached (no gradient), as in PEFT and the paper.  Per host (t = TP size):

    host        m                       norm                          slots
    column      m_i [O/t] like W's rows local: ||W_i + s B_i A||      input_columns (x A^T, or drop(x)
                                                                      when dropping: the SP all-gather
                                                                      then carries I columns),
                                                                      local_addend, output_scale
    row         replicated [O]          n^2 = sum_i ||W_i + s B A_i||^2: reduction_payload (n_i^2 as
                                        rides in the ONE reduction    rows; dropping: the adapter part
                                                                      as O extra columns), output_scale
    replicated  replicated              local                         local_addend, output_scale

m's gradient on a row host is complete on every rank without sequence parallelism (y is whole
there) and a partial over the sequence slices with it (summed by finalize_grads); on a column
host it is complete.  The math is in `adapters/functional.py`.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from parallel_adapters.adapters import functional as lf
from parallel_adapters.adapters.kinds import register_kind
from parallel_adapters.adapters.kinds.lora import EMBEDDING_A, EMBEDDING_B, LORA_A, LORA_B, LoRAKind
from parallel_adapters.adapters.kinds.protocol import (
    INPUT_COLUMNS, LOCAL_ADDEND, OUTPUT_SCALE, REDUCTION_PAYLOAD, AdapterView, ReductionPayload, TensorDecl,
)
from parallel_adapters.config import LoraConfig
from parallel_adapters.distributed.sharding import REPLICATED, ShardSpec
from parallel_adapters.distributed.geometry import EMBEDDING_MODES, LinearGeometry

MAGNITUDE = "lora_magnitude_vector"  # `<module>.lora_magnitude_vector.<adapter>.weight`, as PEFT's module


class DoRAKind(LoRAKind):
    name = "dora"
    tensor_axes = MappingProxyType({**LoRAKind.tensor_axes, MAGNITUDE: (0, None)})
    slot_table = MappingProxyType({
        "column": frozenset({INPUT_COLUMNS, LOCAL_ADDEND, OUTPUT_SCALE}),
        "row": frozenset({REDUCTION_PAYLOAD, OUTPUT_SCALE}),
        "replicated": frozenset({LOCAL_ADDEND, OUTPUT_SCALE}),
        "vocab": frozenset({REDUCTION_PAYLOAD, OUTPUT_SCALE}),
        "embedding": frozenset({LOCAL_ADDEND, OUTPUT_SCALE}),
    })

    def accepts(self, config: Any) -> bool:
        return isinstance(config, LoraConfig) and config.use_dora

    def tensors(self, geometry: LinearGeometry, hparams: Mapping[str, Any]) -> tuple[TensorDecl, ...]:
        mode = geometry.parallel_mode
        spec = ShardSpec(dim=0, chunks=geometry.chunks) if mode == "column" else REPLICATED
        partial = geometry.sequence_parallel if mode in _REDUCED_MODES else None
        return (*super().tensors(geometry, hparams),
                TensorDecl(MAGNITUDE, (geometry.out_features,), spec, partial_grad=partial))

    def full_tensors(self, config: LoraConfig, geometry: LinearGeometry, hparams: Mapping[str, Any],
                     generator: torch.Generator) -> dict[str, torch.Tensor]:
        full = super().full_tensors(config, geometry, hparams, generator)
        full[MAGNITUDE] = torch.ones(geometry.out_features, dtype=torch.float64)  # set by initial_tensors
        return full

    def initial_tensors(self, view: AdapterView) -> dict[str, torch.Tensor]:
        """m = ||W + s B A||_row of the weight at add time (PEFT's update_layer)."""
        return {MAGNITUDE: self._squared_norms(view).sqrt()}

    def merged_delta(self, view: AdapterView) -> torch.Tensor:
        """(f - 1) W_i + f s B A on this shard (PEFT's merge W' = f (W + s B A))."""
        a, b = _factors(view)
        norms, m, s = self._squared_norms(view), view.tensors[MAGNITUDE], view.hparams["scaling"]
        if view.geometry.parallel_mode in EMBEDDING_MODES:  # the table [V, H]: the norm runs down its columns
            return lf.dora_merged_delta(view.weight.t(), a, b, s, m, norms).t()
        return lf.dora_merged_delta(view.weight, a, b, s, m, norms)

    def accepts_stored(self, config: Mapping[str, Any]) -> bool:
        return bool(config.get("use_dora"))

    def stored_hparams(self, config: Mapping[str, Any], module: str,
                       shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
        return super().stored_hparams(config, module, _without_magnitude(module, shapes))

    def peft_hparams(self, peft_config: Mapping[str, Any], module: str,
                     shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
        return super().peft_hparams(peft_config, module, _without_magnitude(module, shapes))

    def axes(self, tensor_name: str, embedding: bool,
             hparams: Mapping[str, Any] | None = None) -> tuple[int | None, int | None]:
        """A table's magnitude has one entry per width column (PEFT's DoraEmbeddingLayer)."""
        return (None, 0) if embedding and tensor_name == MAGNITUDE else super().axes(tensor_name, embedding, hparams)

    def peft_key(self, tensor_name: str) -> str:
        return MAGNITUDE if tensor_name == MAGNITUDE else super().peft_key(tensor_name)

    # -- slots ---------------------------------------------------------------------------------

    def input_columns(self, view: AdapterView, x: torch.Tensor) -> torch.Tensor:
        """z = x A^T, or drop(x) itself when dropping (its base matmul needs it whole)."""
        return view.dropout(x) if view.dropout is not None else lf.lora_down(x, view.tensors[LORA_A])

    def local_addend(self, view: AdapterView, x: torch.Tensor, y: torch.Tensor,
                     columns: torch.Tensor | None) -> torch.Tensor:
        if view.dropout is None:  # y + s z B^T; output_scale applies f
            return super().local_addend(view, x, y, columns)
        dropped = view.dropout(x) if columns is None else columns
        f = self._scale(view, y.dtype)
        lora = lf.lora_up(lf.lora_down(dropped, view.tensors[LORA_A]), view.tensors[LORA_B], view.hparams["scaling"])
        return y + (f - 1) * F.linear(dropped, view.weight) + f * lora

    def output_scale(self, view: AdapterView, x: torch.Tensor, y: torch.Tensor,
                     reduced: ReductionPayload | None) -> torch.Tensor:
        if reduced is None:  # column, replicated: the norm is local
            return y if view.dropout is not None else y * self._scale(view, y.dtype)
        f = lf.dora_scale(view.tensors[MAGNITUDE], reduced.rows, y.dtype)
        return y * f if reduced.columns is None else y + f * reduced.columns

    def payload_rows(self, view: AdapterView) -> torch.Tensor:
        """This shard's ||W_i + s B A_i||^2 [O], a partial sum over TP (a table's: per width column,
        over this rank's vocabulary rows)."""
        a, b = _factors(view)
        weight = view.weight.t() if view.geometry.parallel_mode in EMBEDDING_MODES else view.weight
        return lf.dora_squared_norms(weight, a, b, view.hparams["scaling"])

    def reduction_payload(self, view: AdapterView, x: torch.Tensor, partial: torch.Tensor) -> ReductionPayload:
        """Dropout 0 / eval: partial + s z_i B^T, rows n_i^2 (output_scale multiplies by f).
        Dropping: f is known only after the reduction, so the adapter part D_i + s z_i B^T
        (D_i = drop(x_i) W_i^T) rides as O extra columns and the partial becomes x_i W_i^T - D_i."""
        rows = self.payload_rows(view)
        if view.dropout is None:
            return ReductionPayload(super().local_addend(view, x, partial, None), None, rows)
        dropped = view.dropout(x)
        base = F.linear(dropped, view.weight)
        lora = lf.lora_up(lf.lora_down(dropped, view.tensors[LORA_A]), view.tensors[LORA_B], view.hparams["scaling"])
        return ReductionPayload(partial - base, base + lora, rows)

    # -- internals -----------------------------------------------------------------------------

    def _squared_norms(self, view: AdapterView) -> torch.Tensor:
        """||W + s B A||^2 per local output row: summed over TP (`view.reduced`) on a row host."""
        if view.geometry.parallel_mode in _REDUCED_MODES:
            if view.reduced is None:
                raise ValueError("a DoRA norm on a row-parallel layer needs the rows summed over TP")
            return view.reduced
        return self.payload_rows(view)

    def _scale(self, view: AdapterView, dtype: torch.dtype) -> torch.Tensor:
        return lf.dora_scale(view.tensors[MAGNITUDE], self.payload_rows(view), dtype)


_REDUCED_MODES = ("row", "vocab")
"""Hosts whose norms are partial over TP (the weight's columns, or a table's rows, are split)."""


def _factors(view: AdapterView) -> tuple[torch.Tensor, torch.Tensor]:
    t = view.tensors
    return (t[EMBEDDING_A], t[EMBEDDING_B]) if EMBEDDING_A in t else (t[LORA_A], t[LORA_B])


def _without_magnitude(module: str, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """A stored DoRA module's factor shapes, after checking the magnitude is there and fits B."""
    if MAGNITUDE not in shapes:
        raise ValueError(f"{module}: {MAGNITUDE} is missing (have {sorted(shapes)})")
    rest = {n: s for n, s in shapes.items() if n != MAGNITUDE}
    if LORA_B in rest and shapes[MAGNITUDE] != (rest[LORA_B][0],):
        raise ValueError(f"{module}: {MAGNITUDE} {shapes[MAGNITUDE]} does not match {LORA_B} {rest[LORA_B]}")
    return rest


DORA = register_kind(DoRAKind())
