"""Hugging Face checkpoints (Llama, Mistral, Qwen2, Qwen3; MoE: Qwen3-MoE, Mixtral) <-> a Megatron
GPT built by `gpt.build_gpt`, at any TP/PP (MoE: any TP x EP x ETP x PP).

- `gpt_settings_from_hf(hf_dir)`: the GPTSettings that reproduce the HF architecture (unsupported
  features such as biases, scaled RoPE or sliding windows are refused with the field's name).
- `import_hf_checkpoint(model, hf_dir)`: each rank reads only its own slices from the safetensors
  files (get_slice): the heads of its query groups, its rows of gate/up, its columns of
  o_proj/down_proj, its vocabulary rows; padded vocab rows are zero.
- `export_hf_checkpoint(model, out_dir)`: the base weights as they are now (merge adapters first
  to export a merged model), gathered over TP one parameter at a time; each pipeline stage writes
  its own shard files, world rank 0 the index and config.json.

The names and layouts are the pure functions of `hf/mapping.py` (shared with the offline PEFT
export and merge); this module adds what Megatron knows: global parameter names under PP and the
ShardSpec of every parameter.
"""
from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

import torch
from tqdm import tqdm

from parallel_adapters.distributed import collectives as C
from parallel_adapters.distributed.agreement import raise_together
from parallel_adapters.distributed.groups import ParallelGroups
from parallel_adapters.hf.config import LlamaShape, read_hf_config
from parallel_adapters.hf.files import (
    DEFAULT_MAX_SHARD_BYTES, HFCheckpoint, ShardedSafetensorsWriter, plan_shards, shard_file_names,
    tensor_nbytes, write_weight_index,
)
from parallel_adapters.hf.mapping import (
    EXPERT_PREFIX, expected_hf_shapes, hf_to_megatron_tensor, local_ranges, megatron_to_hf_tensors, row_segments,
    split_parameter_name,
)
from parallel_adapters.mcore.compat import megatron_parallel_groups
from parallel_adapters.mcore.gpt import GPTSettings, global_parameter_names, param_shard_spec
from parallel_adapters.mcore.moe import is_expert_parameter, split_group

__all__ = ["gpt_settings_from_hf", "gpt_config_from_hf", "import_hf_checkpoint", "export_hf_checkpoint",
           "hf_config_from_model"]

_IGNORED_HF = re.compile(r"\.rotary_emb\.inv_freq$")  # buffers some old checkpoints saved


def gpt_settings_from_hf(hf_dir: str | Path | Mapping[str, Any], **overrides: Any) -> GPTSettings:
    """GPTSettings for the model in `hf_dir` (a directory, config.json path or config dict).

    `overrides` set the fields config.json does not decide (sequence_parallel, params_dtype,
    vocab_pad_multiple, ...); params_dtype stays float32 unless given, whatever the file's dtype."""
    shape = LlamaShape.from_config(read_hf_config(hf_dir), _where(hf_dir))
    settings = GPTSettings(
        num_layers=shape.num_layers, hidden_size=shape.hidden_size, ffn_hidden_size=shape.intermediate_size,
        num_attention_heads=shape.num_heads, num_query_groups=shape.num_kv_heads, kv_channels=shape.head_dim,
        vocab_size=shape.vocab_size, max_position_embeddings=shape.max_position_embeddings,
        rotary_base=shape.rope_theta, norm_epsilon=shape.rms_norm_eps, tie_embeddings=shape.tie_word_embeddings,
        attention_dropout=shape.attention_dropout, add_qkv_bias=shape.qkv_bias, qk_layernorm=shape.qk_norm,
        **_moe_settings(shape),
    )
    return replace(settings, **overrides)


def _moe_settings(shape: LlamaShape) -> dict[str, Any]:
    """The GPTSettings MoE fields that route as transformers does.  HF: softmax over all experts
    (float32), top-k, then (norm_topk_prob / Mixtral) renormalise the k.  Megatron's router does
    top-k on the logits then softmax over the k (the same numbers as renormalising), or with
    moe_router_pre_softmax softmax over all then top-k (the same as not renormalising); it too
    takes the softmax in float32.  No capacity factor (no token dropped), as transformers."""
    if not shape.num_experts:
        return {}
    return dict(num_moe_experts=shape.num_experts, moe_router_topk=shape.moe_topk,
                moe_ffn_hidden_size=shape.moe_intermediate_size, moe_router_pre_softmax=not shape.norm_topk_prob)


gpt_config_from_hf = gpt_settings_from_hf
"""Alias of gpt_settings_from_hf (the GPT configuration read from an HF config.json)."""


def _where(source: Any) -> str:
    if isinstance(source, Mapping):
        return "config.json"
    path = Path(source)
    return str(path / "config.json" if path.is_dir() else path)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside an AdapterModel and/or megatron DDP / Float16Module wrappers."""
    inner = model
    for _ in range(8):
        if hasattr(inner, "adapter_layers") and hasattr(inner, "model"):
            inner = inner.model
        elif hasattr(inner, "module"):
            inner = inner.module
        else:
            break
    return inner


def _base_parameters(inner: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(global name, parameter) of the base model, adapter tensors (of any kind) left out."""
    names = global_parameter_names(inner)
    return [(names[local], p) for local, p in inner.named_parameters() if not getattr(p, "adapter_tensor", False)]


def _model_mismatches(inner: torch.nn.Module, shape: LlamaShape) -> list[str]:
    """How the built model differs from the HF config (fields that change the numbers)."""
    c = inner.config
    pairs = {
        "num_layers / num_hidden_layers": (c.num_layers, shape.num_layers),
        "hidden_size": (c.hidden_size, shape.hidden_size),
        "ffn_hidden_size / intermediate_size": (c.ffn_hidden_size, shape.intermediate_size),
        "num_attention_heads": (c.num_attention_heads, shape.num_heads),
        "num_query_groups / num_key_value_heads": (c.num_query_groups or c.num_attention_heads, shape.num_kv_heads),
        "kv_channels / head_dim": (c.kv_channels, shape.head_dim),
        "vocab_size": (getattr(inner, "unpadded_vocab_size", inner.vocab_size), shape.vocab_size),
        "tie_embeddings / tie_word_embeddings": (bool(inner.share_embeddings_and_output_weights),
                                                 shape.tie_word_embeddings),
        "rotary_base / rope_theta": (float(inner.rotary_base), shape.rope_theta),
        "layernorm_epsilon / rms_norm_eps": (c.layernorm_epsilon, shape.rms_norm_eps),
        "normalization": (c.normalization, "RMSNorm"),
        "gated_linear_unit": (bool(c.gated_linear_unit), True),
        "add_bias_linear": (bool(c.add_bias_linear), False),
        "add_qkv_bias (q/k/v biases: qwen2)": (bool(getattr(c, "add_qkv_bias", False)), shape.qkv_bias),
        "qk_layernorm (q_norm / k_norm: qwen3)": (bool(c.qk_layernorm), shape.qk_norm),
        "num_moe_experts / num_experts": (c.num_moe_experts or 0, shape.num_experts),
    }
    if shape.num_experts:
        pairs.update({
            "moe_router_topk / num_experts_per_tok": (c.moe_router_topk, shape.moe_topk),
            "moe_ffn_hidden_size / moe_intermediate_size": (c.moe_ffn_hidden_size, shape.moe_intermediate_size),
            "moe_router_pre_softmax / not norm_topk_prob": (bool(c.moe_router_pre_softmax), not shape.norm_topk_prob),
            "moe_shared_expert_intermediate_size": (c.moe_shared_expert_intermediate_size, None),
            "moe_router_score_function": (c.moe_router_score_function, "softmax"),
        })
    return [f"{k}: model {m!r}, Hugging Face {h!r}" for k, (m, h) in pairs.items() if m != h]


@torch.no_grad()
def import_hf_checkpoint(model: torch.nn.Module, hf_dir: str | Path, groups: ParallelGroups | None = None,
                         progress: bool = False) -> None:
    """Load the HF base weights into this rank's part of `model` (built from
    `gpt_settings_from_hf(hf_dir)`), reading only this rank's slices.  No communication.

    ValueError (CheckpointError) naming the field, tensor and file when the checkpoint does not
    match its config or the model."""
    hf_dir = Path(hf_dir)
    groups = groups or megatron_parallel_groups()
    inner = _unwrap(model)
    shape = LlamaShape.from_config(read_hf_config(hf_dir), _where(hf_dir))
    problems = _model_mismatches(inner, shape)
    if problems:
        raise ValueError(f"the model does not match {hf_dir}/config.json:\n    " + "\n    ".join(problems))
    ckpt = HFCheckpoint(hf_dir)
    ignore = [n for n in ckpt.names() if _IGNORED_HF.search(n)]
    ckpt.check_shapes(expected_hf_shapes(shape), ignore + (["lm_head.weight"] if shape.tie_word_embeddings else []))

    def read(name: str, start: int, stop: int, cols):
        return ckpt.read(name, start, stop, cols)

    params = _base_parameters(inner)
    for name, param in tqdm(params, desc="import HF", disable=not progress, leave=False):
        spec = param_shard_spec(param)
        _, size, rank = split_group(name, groups)  # a routed expert is split over ETP, the rest over TP
        global_shape = spec.global_shape(param.shape, size)
        row_ranges, col_ranges = local_ranges(spec, global_shape, rank, size)
        local = hf_to_megatron_tensor(name, read, shape, global_shape[0], row_ranges, col_ranges)
        if tuple(local.shape) != tuple(param.shape):
            raise ValueError(f"{name}: read {tuple(local.shape)} from {hf_dir}, this rank's parameter is "
                             f"{tuple(param.shape)}")
        param.copy_(local.to(param.dtype))


def _family(c) -> dict[str, Any]:
    """The model_type-specific config.json fields: Llama; Qwen2 (q/k/v biases); Qwen3 (q/k norms);
    Qwen3-MoE (q/k norms, MoE); Mixtral (MoE)."""
    qwen2, qk, moe = bool(getattr(c, "add_qkv_bias", False)), bool(c.qk_layernorm), bool(c.num_moe_experts)
    if qwen2 and (qk or moe):
        raise ValueError("hf_config_from_model: q/k/v biases with q/k norms or experts match no supported family")
    if moe and c.moe_shared_expert_intermediate_size:
        raise ValueError("hf_config_from_model: shared experts match no supported family (Qwen3-MoE, Mixtral)")
    if moe and not qk and c.moe_router_pre_softmax:
        raise ValueError("hf_config_from_model: Mixtral always renormalises the top-k; moe_router_pre_softmax "
                         "must be False")
    routing = {"num_experts_per_tok": c.moe_router_topk}
    if moe and qk:
        return {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "use_sliding_window": False,
                "attention_bias": False, "num_experts": c.num_moe_experts, **routing,
                "moe_intermediate_size": c.moe_ffn_hidden_size, "norm_topk_prob": not c.moe_router_pre_softmax,
                "decoder_sparse_step": 1, "mlp_only_layers": []}
    if moe:
        return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_local_experts": c.num_moe_experts,
                **routing, "intermediate_size": c.moe_ffn_hidden_size, "router_jitter_noise": 0.0}
    if qk:
        return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "use_sliding_window": False,
                "attention_bias": False}
    if qwen2:
        return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": False}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False, "mlp_bias": False}


def hf_config_from_model(model: torch.nn.Module) -> dict:
    """A transformers-5 config.json (Llama, Qwen2, Qwen3, Qwen3-MoE or Mixtral) describing a model
    built by `build_gpt`."""
    inner = _unwrap(model)
    c = inner.config
    if c.normalization != "RMSNorm" or not c.gated_linear_unit or c.add_bias_linear:
        raise ValueError("hf_config_from_model: only RMSNorm + SwiGLU models without biases (but on "
                         "q/k/v: Qwen2) map to a Hugging Face family")
    family = _family(c)
    return {
        "hidden_size": c.hidden_size, "intermediate_size": c.ffn_hidden_size,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_query_groups or c.num_attention_heads, "head_dim": c.kv_channels,
        "vocab_size": int(getattr(inner, "unpadded_vocab_size", inner.vocab_size)),
        "max_position_embeddings": int(inner.max_sequence_length), "rms_norm_eps": c.layernorm_epsilon,
        "rope_parameters": {"rope_theta": float(inner.rotary_base), "rope_type": "default"},
        "tie_word_embeddings": bool(inner.share_embeddings_and_output_weights),
        "hidden_act": "silu",
        "attention_dropout": float(c.attention_dropout), "initializer_range": c.init_method_std,
        "dtype": str(c.params_dtype).removeprefix("torch."),
        **family,
    }


def _ep_names(name: str, shape: LlamaShape, groups: ParallelGroups) -> list[str]:
    """Global names of `name` on every EP rank, in EP-rank order: a routed expert's local index i
    is expert e * num_local + i on EP rank e; any other parameter is the same everywhere ([name])."""
    if not is_expert_parameter(name) or groups.ep_size == 1:
        return [name]
    head, rest = name.split(EXPERT_PREFIX, 1)
    index, tail = rest.split(".", 1)
    local = shape.num_experts // groups.ep_size
    i = int(index) - groups.ep_rank * local
    return [f"{head}{EXPERT_PREFIX}{e * local + i}.{tail}" for e in range(groups.ep_size)]


def _stage_layout(params, shape: LlamaShape, groups: ParallelGroups, dtype: torch.dtype | None) -> list:
    """(HF name, dtype, shape) of every HF tensor this stage writes, in writing order (a local
    expert's weights are followed by those of the same local expert of the other EP ranks)."""
    layout = []
    for name, param in params:
        module, leaf = split_parameter_name(name)
        if module == "output_layer" and shape.tie_word_embeddings:
            continue
        global_shape = param_shard_spec(param).global_shape(param.shape, split_group(name, groups)[1])
        for global_name in _ep_names(name, shape, groups):
            sizes: dict[str, int] = {}
            for seg in row_segments(split_parameter_name(global_name)[0], shape, global_shape[0], "." + leaf):
                if seg.hf_name is not None:
                    sizes[seg.hf_name] = sizes.get(seg.hf_name, 0) + seg.stop - seg.start
            layout += [(n, dtype or param.dtype, (rows, *global_shape[1:])) for n, rows in sizes.items()]
    return layout


def export_hf_checkpoint(model: torch.nn.Module, out_dir: str | Path, groups: ParallelGroups | None = None, *,
                         hf_config: str | Path | Mapping[str, Any] | None = None,
                         max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, dtype: torch.dtype | None = None,
                         progress: bool = False) -> Path:
    """Collective (every rank): write the model's current base weights as a HF checkpoint.

    `hf_config` (a config dict, config.json or model directory) is written as config.json after a
    consistency check; by default one is derived from the model.  `dtype` casts the output."""
    out = Path(out_dir)
    groups = groups or megatron_parallel_groups()
    inner = _unwrap(model)
    cfg = read_hf_config(hf_config) if hf_config is not None else hf_config_from_model(inner)
    shape = LlamaShape.from_config(cfg, "hf_config")
    problems = _model_mismatches(inner, shape)
    if problems:
        raise ValueError("export_hf_checkpoint: the model does not match hf_config:\n    " + "\n    ".join(problems))
    params = _base_parameters(inner)
    layout = _stage_layout(params, shape, groups, dtype)
    shards = plan_shards(layout, max_shard_bytes)
    stage_files = C.all_gather_objects((groups.pp_rank, len(shards)), None)
    per_stage = dict(stage_files)
    offset = sum(n for s, n in per_stage.items() if s < groups.pp_rank)
    names = shard_file_names(len(shards), offset, sum(per_stage.values()))
    writer, error = None, None
    if groups.tp_rank == 0 and groups.dp_rank == 0:
        try:
            out.mkdir(parents=True, exist_ok=True)
            writer = ShardedSafetensorsWriter(out, layout, shards, names)
        except OSError as exc:
            error = f"rank {C.group_rank(None)}: {exc}"
    if groups.dp_rank == 0 or shape.num_experts:  # EP ranks span DP: all take part in the expert gathers
        error = _write_stage(params, shape, groups, writer, dtype, progress) or error
    raise_together(error, f"export_hf_checkpoint to {out}", error_type=OSError)  # no writer left waiting
    stage_bytes = sum(tensor_nbytes(d, s) for _, d, s in layout)
    reports = C.all_gather_objects((writer.weight_map, stage_bytes) if writer is not None else ({}, 0), None)
    if C.group_rank(None) == 0:
        weight_map = {k: v for m, _ in reports for k, v in m.items()}
        if len(set(weight_map.values())) > 1:
            write_weight_index(out, weight_map, sum(n for _, n in reports))
        (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    C.barrier(None)
    return out


def _write_stage(params, shape: LlamaShape, groups: ParallelGroups, writer, dtype, progress: bool) -> str | None:
    """Gather each parameter over TP (all TP ranks of the stage), convert, append to the files.

    A write error stops the writing but not the gathers (the other TP ranks are in them); it is
    returned for the collective agreement."""
    error = None
    for name, param in tqdm(params, desc="export HF", disable=not (progress and writer is not None), leave=False):
        module, _ = split_parameter_name(name)
        if module == "output_layer" and shape.tie_word_embeddings:
            continue
        spec = param_shard_spec(param)
        local = param.detach()
        group = split_group(name, groups)[0]  # ETP for a routed expert, else TP
        full = local if spec.replicated else spec.unshard(C.all_gather_tensor(local.contiguous(), group))
        names = _ep_names(name, shape, groups)
        fulls = C.all_gather_tensor(full.contiguous(), groups.ep_group) if len(names) > 1 else [full]
        if writer is None or error is not None:
            continue
        try:
            for global_name, tensor in zip(names, fulls):
                for hf_name, hf_tensor in megatron_to_hf_tensors(global_name, tensor, shape).items():
                    writer.write(hf_name, hf_tensor.to(dtype or hf_tensor.dtype))
        except (OSError, ValueError) as exc:
            error = f"rank {C.group_rank(None)}, {name}: {exc}"
    if writer is not None and error is None:
        try:
            writer.close()
        except (OSError, ValueError) as exc:
            error = f"rank {C.group_rank(None)}: {exc}"
    return error
