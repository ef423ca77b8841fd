"""PEFT export of a prefix-tuning adapter (PEFT's PREFIX_TUNING): a model-level adapter, offline
(no megatron, no process group).

The consolidated checkpoint holds each layer's prefix whole, `prefix_tuning.<adapter>.layers.<l>.weight`
[n, 2, D] (keys, values; D = KV heads x head_dim), or PEFT's prefix_projection encoder under
`prefix_tuning.<adapter>.encoder.<PEFT name>`.  PEFT's adapter_model.safetensors holds one
`prompt_embeddings` [n, 2 L D]: the layers' tables in PEFT's layout, or the encoder's output
computed in float64 (what PEFT's own save writes; its inference mode reads that table, not the
encoder).  adapter_config.json gets PEFT's PrefixTuningConfig fields with the GQA rule's token_dim
and num_attention_heads from the HF config.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from parallel_adapters.adapters.prefix_encoder import PEFT_KEY, encoded_table, peft_config_fields, peft_table
from parallel_adapters.checkpoint.export_prompt_learning import adapter_keys, read_checked, write_peft_files
from parallel_adapters.hf.config import LlamaShape

KIND_NAME = "prefix_tuning"
_KEY = re.compile(r"^prefix_tuning\.(?P<adapter>[^.]+)\.(?P<tensor>layers\.\d+\.weight|encoder\..+)$")


def is_prefix_stored_config(config: Mapping[str, Any] | None) -> bool:
    """A checkpoint's (adapter_kind) or a PEFT adapter_config.json's (peft_type) prefix adapter."""
    return isinstance(config, Mapping) and (config.get("adapter_kind") == KIND_NAME
                                            or config.get("peft_type") == "PREFIX_TUNING")


def refuse_merge(config: Mapping[str, Any] | None, source: object) -> None:
    """A prefix adapter has no weight delta: say so instead of failing on its tensors' names."""
    from parallel_adapters.checkpoint.layout import CheckpointError

    if is_prefix_stored_config(config):
        raise CheckpointError(f"{source}: cannot merge a prefix-tuning adapter: it adds trained keys and values to "
                              "every attention layer and changes no weight, so there is nothing to fold into the base "
                              "(PEFT cannot merge prompt learning adapters either); export it with export_peft and "
                              "run the base with it (PeftModel.from_pretrained)")


def prefix_keys(names: list[str], adapter_name: str | None) -> dict[str, str]:
    """{tensor name under the adapter: checkpoint key} of the prefix adapter to export."""
    return adapter_keys(names, adapter_name, _KEY, "prefix-tuning",
                        "prefix_tuning.<adapter>.layers.<l>.weight or .encoder.<tensor>", "prefix", "prefixes")


def _table(keys: Mapping[str, str], read: Callable[[str], torch.Tensor], shape: LlamaShape,
           options: Any) -> torch.Tensor:
    tensors = read_checked(keys, read, options.allow_nonfinite)
    if all(name.startswith("encoder.") for name in tensors):
        encoder = {name[len("encoder."):]: t for name, t in tensors.items()}
        return encoded_table(encoder, shape.num_layers).to(encoder["embedding.weight"].dtype)
    layers = {int(name.split(".")[1]): t for name, t in tensors.items() if name.startswith("layers.")}
    if len(layers) != len(tensors) or len(layers) != shape.num_layers:
        raise ValueError(f"prefix tensors {sorted(keys.values())}: expected one table per layer of the HF "
                         f"config's {shape.num_layers} layers, or the encoder alone")
    return peft_table(layers)


def write_prefix_export(meta: Mapping[str, torch.Tensor], read: Callable[[str], torch.Tensor],
                        adapter_config: Mapping[str, Any], hf_cfg: Mapping[str, Any], tmp: Path,
                        weights_file: str, config_file: str, options: Any) -> None:
    """adapter_model.safetensors ({PEFT_KEY: [n, 2 L D]}) and adapter_config.json into `tmp`."""
    shape = LlamaShape.from_config(hf_cfg, "hf_config")
    table = _table(prefix_keys(list(meta), options.adapter_name), read, shape, options)
    token_dim = shape.num_kv_heads * shape.head_dim
    if table.shape[1] != 2 * shape.num_layers * token_dim:
        raise ValueError(f"the prefix table is {list(table.shape)}; the HF config needs 2 x {shape.num_layers} layers "
                         f"x {token_dim} (KV heads x head_dim) columns")
    config = peft_config_fields(adapter_config, tuple(table.shape), shape.num_kv_heads, shape.num_layers,
                                options.base_model_name_or_path)
    tensor = table.to(options.dtype or table.dtype).contiguous()
    write_peft_files(tmp, weights_file, config_file, PEFT_KEY, tensor, config)
