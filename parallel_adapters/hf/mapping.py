"""Llama-family Hugging Face <-> Megatron names and layouts, as pure functions (torch only).

No megatron import here, so the offline tools (PEFT export, merge) use exactly the mapping the
in-cluster import uses.  `mcore/hf_bridge.py` builds on it with Megatron's parameter attributes.

Every Megatron tensor that maps onto Hugging Face tensors is described by its ROW SEGMENTS along
dim 0: runs of rows that come from one HF tensor (or are vocabulary padding, zeros).  One
description serves base weights and LoRA B factors alike (B has the same output rows as W):

    linear_qkv  per query group g: [q heads of g (nq/ng heads); k head g; v head g]
    linear_fc1  [gate; up]   (the TP split's stride-2 chunking is the ShardSpec's business)
    word_embeddings / output_layer   [vocab rows; zero padding rows]
    everything else                  one segment, the HF tensor itself

Name table (N = global layer index; tensors end in ".weight"):

    embedding.word_embeddings            model.embed_tokens
    decoder.layers.N.input_layernorm     model.layers.N.input_layernorm
    decoder.layers.N.self_attention.linear_qkv   model.layers.N.self_attn.{q,k,v}_proj
    decoder.layers.N.self_attention.linear_proj  model.layers.N.self_attn.o_proj
    decoder.layers.N.pre_mlp_layernorm   model.layers.N.post_attention_layernorm
    decoder.layers.N.mlp.linear_fc1      model.layers.N.mlp.{gate,up}_proj
    decoder.layers.N.mlp.linear_fc2      model.layers.N.mlp.down_proj
    decoder.final_layernorm              model.norm
    decoder.layers.N.self_attention.q_layernorm / k_layernorm   ...self_attn.q_norm / k_norm (Qwen3)

Mixture of experts (E = global expert index; M = mlp (Qwen3-MoE) or block_sparse_moe (Mixtral);
gate / up / down = gate_proj / up_proj / down_proj (Qwen3-MoE) or w1 / w3 / w2 (Mixtral)):

    decoder.layers.N.mlp.router                           model.layers.N.M.gate
    decoder.layers.N.mlp.experts.local_experts.E.linear_fc1   model.layers.N.M.experts.E.{gate,up}
    decoder.layers.N.mlp.experts.local_experts.E.linear_fc2   model.layers.N.M.experts.E.down

This is the checkpoint layout (the Hub's, and what transformers 5 `save_pretrained` writes back
from its fused in-memory `experts.gate_up_proj` [E, 2 ffn, H] / `experts.down_proj` [E, H, ffn]).
    output_layer                         lm_head (model.embed_tokens when tied; absent from HF file)
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Mapping, Sequence

import torch

from parallel_adapters.distributed.sharding import ShardSpec
from parallel_adapters.hf.config import LlamaShape

HF_LINEAR_NAMES: dict[str, tuple[str, ...]] = {
    "linear_qkv": ("q_proj", "k_proj", "v_proj"),
    "linear_proj": ("o_proj",),
    "linear_fc1": ("gate_proj", "up_proj"),
    "linear_fc2": ("down_proj",),
}
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_ATTENTION = {
    "input_layernorm": ("input_layernorm",),
    "self_attention.linear_qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attention.linear_proj": ("self_attn.o_proj",),
    "pre_mlp_layernorm": ("post_attention_layernorm",),
}
_QK_NORM = {"self_attention.q_layernorm": ("self_attn.q_norm",), "self_attention.k_layernorm": ("self_attn.k_norm",)}
_DENSE_MLP = {"mlp.linear_fc1": ("mlp.gate_proj", "mlp.up_proj"), "mlp.linear_fc2": ("mlp.down_proj",)}
_MOE_NAMES = {"qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
              "mixtral": ("block_sparse_moe", "w1", "w3", "w2")}
"""model_type -> (the MoE block's module, an expert's gate, up and down linears)."""
EXPERT_PREFIX = "mlp.experts.local_experts."


@lru_cache(maxsize=16)
def _layer_modules(shape: LlamaShape) -> dict[str, tuple[str, ...]]:
    """Megatron module inside a layer -> its HF module(s) inside the layer."""
    out = dict(_ATTENTION) | (_QK_NORM if shape.qk_norm else {})
    if not shape.num_experts:
        return out | _DENSE_MLP
    block, gate, up, down = _MOE_NAMES[shape.model_type]
    out["mlp.router"] = (f"{block}.gate",)
    for e in range(shape.num_experts):
        out[f"{EXPERT_PREFIX}{e}.linear_fc1"] = (f"{block}.experts.{e}.{gate}", f"{block}.experts.{e}.{up}")
        out[f"{EXPERT_PREFIX}{e}.linear_fc2"] = (f"{block}.experts.{e}.{down}",)
    return out

RowRanges = Sequence[tuple[int, int]]
Reader = Callable[[str, int, int, "RowRanges | None"], torch.Tensor]
"""read(hf_name, row_start, row_stop, col_ranges) -> rows [start, stop) of that HF tensor,
restricted to the column ranges (None = all columns; ignored for 1-D tensors)."""


# ----------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Segment:
    """Rows [start, stop) of a Megatron tensor come from rows [src_start, ...) of HF tensor
    `hf_name` (None: vocabulary padding, zero rows)."""

    start: int
    stop: int
    hf_name: str | None
    src_start: int = 0


def hf_modules(megatron_module: str, shape: LlamaShape) -> tuple[str, ...]:
    """HF module path(s) of a Megatron module path (global layer index); ValueError if unknown."""
    if megatron_module == "embedding.word_embeddings":
        return ("model.embed_tokens",)
    if megatron_module == "output_layer":
        return ("model.embed_tokens",) if shape.tie_word_embeddings else ("lm_head",)
    if megatron_module == "decoder.final_layernorm":
        return ("model.norm",)
    match = _LAYER.match(megatron_module)
    modules = _layer_modules(shape)
    if match and match.group(2) in modules and int(match.group(1)) < shape.num_layers:
        return tuple(f"model.layers.{match.group(1)}.{m}" for m in modules[match.group(2)])
    raise ValueError(f"no Hugging Face counterpart for Megatron module {megatron_module!r} "
                     f"(a {shape.model_type} model with {shape.num_layers} layers)")


def split_parameter_name(name: str) -> tuple[str, str]:
    """'decoder.layers.0.mlp.linear_fc1.weight' -> ('decoder.layers.0.mlp.linear_fc1', 'weight')."""
    module, _, leaf = name.rpartition(".")
    return module, leaf


def megatron_parameter_names(shape: LlamaShape) -> list[str]:
    """Every parameter name (global, PP=1) of the Megatron model for `shape`."""
    names = ["embedding.word_embeddings.weight"]
    for i in range(shape.num_layers):
        names += [f"decoder.layers.{i}.{m}.weight" for m in _layer_modules(shape)]
        if shape.qkv_bias:
            names.append(f"decoder.layers.{i}.self_attention.linear_qkv.bias")
    names.append("decoder.final_layernorm.weight")
    if not shape.tie_word_embeddings:
        names.append("output_layer.weight")
    return names


def expected_hf_shapes(shape: LlamaShape) -> dict[str, tuple[int, ...]]:
    """Every tensor of the HF checkpoint for `shape`, with its shape."""
    return dict(_hf_shapes(shape))


@lru_cache(maxsize=16)
def _hf_shapes(shape: LlamaShape) -> dict[str, tuple[int, ...]]:
    h, i, hd = shape.hidden_size, shape.intermediate_size, shape.head_dim
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (shape.vocab_size, h)}
    for n in range(shape.num_layers):
        p = f"model.layers.{n}."
        out.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (shape.num_heads * hd, h),
            p + "self_attn.k_proj.weight": (shape.num_kv_heads * hd, h),
            p + "self_attn.v_proj.weight": (shape.num_kv_heads * hd, h),
            p + "self_attn.o_proj.weight": (h, shape.num_heads * hd),
        })
        if shape.qk_norm:
            out.update({p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)})
        if not shape.num_experts:
            out.update({p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                        p + "mlp.down_proj.weight": (h, i)})
        else:
            block, gate, up, down = _MOE_NAMES[shape.model_type]
            ei = shape.moe_intermediate_size
            out[f"{p}{block}.gate.weight"] = (shape.num_experts, h)
            for e in range(shape.num_experts):
                x = f"{p}{block}.experts.{e}."
                out.update({f"{x}{gate}.weight": (ei, h), f"{x}{up}.weight": (ei, h), f"{x}{down}.weight": (h, ei)})
        if shape.qkv_bias:
            out.update({p + "self_attn.q_proj.bias": (shape.num_heads * hd,),
                        p + "self_attn.k_proj.bias": (shape.num_kv_heads * hd,),
                        p + "self_attn.v_proj.bias": (shape.num_kv_heads * hd,)})
    out["model.norm.weight"] = (h,)
    if not shape.tie_word_embeddings:
        out["lm_head.weight"] = (shape.vocab_size, h)
    return out


# ----------------------------------------------------------------------------------------------
# Row segments
# ----------------------------------------------------------------------------------------------

def row_segments(megatron_module: str, shape: LlamaShape, rows: int, suffix: str = ".weight") -> list[Segment]:
    """The row layout of a Megatron tensor with `rows` output rows; HF names get `suffix`.

    ValueError if `rows` does not fit the module (a model built from other settings)."""
    names = [m + suffix for m in hf_modules(megatron_module, shape)]
    leaf = megatron_module.rsplit(".", 1)[-1]
    if leaf == "linear_qkv":
        return _qkv_segments(names, shape, rows, megatron_module)
    if leaf == "linear_fc1":
        half = _fc1_half(megatron_module, shape)
        _check_rows(megatron_module, rows, 2 * half)
        return [Segment(0, half, names[0]), Segment(half, 2 * half, names[1])]
    if megatron_module in ("embedding.word_embeddings", "output_layer"):
        if rows < shape.vocab_size:
            raise ValueError(f"{megatron_module}: {rows} rows cannot hold vocab_size={shape.vocab_size}")
        pad = [Segment(shape.vocab_size, rows, None)] if rows > shape.vocab_size else []
        return [Segment(0, shape.vocab_size, names[0])] + pad
    expected = _hf_shapes(shape)[names[0].removesuffix(suffix) + ".weight"][0]
    _check_rows(megatron_module, rows, expected)
    return [Segment(0, rows, names[0])]


def _fc1_half(megatron_module: str, shape: LlamaShape) -> int:
    """Rows of gate (= of up) in linear_fc1: an expert's or the dense MLP's intermediate size."""
    return shape.moe_intermediate_size if EXPERT_PREFIX in megatron_module else shape.intermediate_size


def _qkv_segments(names: list[str], shape: LlamaShape, rows: int, module: str) -> list[Segment]:
    _check_rows(module, rows, shape.qkv_rows)
    hd, qpg = shape.head_dim, shape.heads_per_group
    q_rows = qpg * hd
    segments, start = [], 0
    for g in range(shape.num_kv_heads):
        for name, length, src in ((names[0], q_rows, g * q_rows), (names[1], hd, g * hd), (names[2], hd, g * hd)):
            segments.append(Segment(start, start + length, name, src))
            start += length
    return segments


def _check_rows(module: str, rows: int, expected: int) -> None:
    if rows != expected:
        raise ValueError(f"{module}: {rows} rows, the Hugging Face config implies {expected}")


def read_rows(segments: Sequence[Segment], read: Reader, row_ranges: RowRanges,
              col_ranges: RowRanges | None, like: torch.Tensor | None = None) -> torch.Tensor:
    """Rows `row_ranges` (Megatron coordinates) of the tensor that `segments` describe, reading
    only what is needed from the HF tensors; padding rows are zeros shaped like a real piece."""
    pieces: list[torch.Tensor | tuple[int, None]] = []
    for lo, hi in row_ranges:
        for seg in segments:
            a, b = max(lo, seg.start), min(hi, seg.stop)
            if a >= b:
                continue
            if seg.hf_name is None:
                pieces.append((b - a, None))
            else:
                off = seg.src_start - seg.start
                pieces.append(read(seg.hf_name, a + off, b + off, col_ranges))
    real = next((p for p in pieces if isinstance(p, torch.Tensor)), like)
    if real is None:
        raise ValueError("read_rows: only padding rows requested and no template tensor given")
    out = [p if isinstance(p, torch.Tensor) else real.new_zeros((p[0], *real.shape[1:])) for p in pieces]
    return out[0] if len(out) == 1 else torch.cat(out, dim=0)


def split_rows(segments: Sequence[Segment], full: torch.Tensor, copy: bool = True) -> dict[str, torch.Tensor]:
    """Inverse of `read_rows` over all rows: HF name -> its rows (padding dropped).

    copy=False returns a view where a name's rows are one contiguous range (q/k/v rows interleave
    per query group, so those are gathered into one new tensor either way)."""
    parts: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for seg in segments:
        if seg.hf_name is not None:
            parts.setdefault(seg.hf_name, []).append((seg.src_start, full[seg.start:seg.stop]))
    out = {}
    for name, pieces in parts.items():
        pieces.sort(key=lambda p: p[0])
        expect = 0
        for start, piece in pieces:
            if start != expect:
                raise ValueError(f"split_rows: rows of {name} are not contiguous at {start}")
            expect += piece.shape[0]
        # torch.cat always returns a new contiguous tensor
        out[name] = pieces[0][1] if len(pieces) == 1 and not copy else torch.cat([p for _, p in pieces], dim=0)
    return out


def local_ranges(spec: ShardSpec, global_shape: Sequence[int], tp_rank: int, tp_size: int
                 ) -> tuple[list[tuple[int, int]], list[tuple[int, int]] | None]:
    """(row ranges, column ranges or None) of a rank's piece, in the order `spec.shard` stacks them."""
    rows = [(0, global_shape[0])] if global_shape else [(0, 0)]
    if spec.dim is None:
        return rows, None
    size = global_shape[spec.dim]
    spec.local_shape(global_shape, tp_size)  # divisibility check
    block = size // spec.chunks
    width = block // tp_size
    ranges = [(c * block + tp_rank * width, c * block + (tp_rank + 1) * width) for c in range(spec.chunks)]
    if spec.dim == 0:
        return ranges, None
    if spec.dim == 1:
        return rows, ranges
    raise ValueError(f"ShardSpec dim {spec.dim} is not supported by the Hugging Face bridge")


# ----------------------------------------------------------------------------------------------
# Whole-tensor conversions (tests, offline tools)
# ----------------------------------------------------------------------------------------------

def dict_reader(tensors: Mapping[str, torch.Tensor]) -> Reader:
    """A `Reader` over in-memory HF tensors."""
    def read(name: str, start: int, stop: int, cols: RowRanges | None) -> torch.Tensor:
        if name not in tensors:
            raise ValueError(f"Hugging Face tensor {name!r} is missing")
        rows = tensors[name][start:stop]
        if cols is None or rows.dim() == 1:
            return rows
        return torch.cat([rows[:, a:b] for a, b in cols], dim=1)
    return read


def hf_to_megatron_tensor(name: str, read: Reader, shape: LlamaShape, rows: int,
                          row_ranges: RowRanges | None = None, col_ranges: RowRanges | None = None) -> torch.Tensor:
    """Megatron parameter `name` (global, full `rows`), or the part given by the ranges."""
    module, leaf = split_parameter_name(name)
    segments = row_segments(module, shape, rows, "." + leaf)
    return read_rows(segments, read, row_ranges or [(0, rows)], col_ranges)


def megatron_to_hf_tensors(name: str, full: torch.Tensor, shape: LlamaShape) -> dict[str, torch.Tensor]:
    """HF tensors of one full Megatron parameter; {} for a tied output layer (HF stores none)."""
    module, leaf = split_parameter_name(name)
    if module == "output_layer" and shape.tie_word_embeddings:
        return {}
    return split_rows(row_segments(module, shape, full.shape[0], "." + leaf), full)


def hf_to_megatron_state_dict(hf: Mapping[str, torch.Tensor], shape: LlamaShape,
                              padded_vocab: int | None = None) -> dict[str, torch.Tensor]:
    """Full Megatron tensors (PP=1 names) from a full HF state dict; vocab padded with zero rows."""
    read = dict_reader(hf)
    out = {}
    for name in megatron_parameter_names(shape):
        module, _ = split_parameter_name(name)
        rows = expected_rows(module, shape, padded_vocab)
        out[name] = hf_to_megatron_tensor(name, read, shape, rows)
    return out


def megatron_to_hf_state_dict(megatron: Mapping[str, torch.Tensor], shape: LlamaShape) -> dict[str, torch.Tensor]:
    """Full HF tensors from full Megatron tensors (vocab padding sliced off; tied lm_head omitted)."""
    out: dict[str, torch.Tensor] = {}
    for name, full in megatron.items():
        out.update(megatron_to_hf_tensors(name, full, shape))
    return out


def expected_rows(megatron_module: str, shape: LlamaShape, padded_vocab: int | None = None) -> int:
    """Dim-0 size of a Megatron module's weight (vocab modules: `padded_vocab` or the real vocab)."""
    if megatron_module in ("embedding.word_embeddings", "output_layer"):
        return padded_vocab or shape.vocab_size
    leaf = megatron_module.rsplit(".", 1)[-1]
    if leaf == "linear_qkv":
        return shape.qkv_rows
    if leaf == "linear_fc1":
        return 2 * _fc1_half(megatron_module, shape)
    return _hf_shapes(shape)[hf_modules(megatron_module, shape)[0] + ".weight"][0]
