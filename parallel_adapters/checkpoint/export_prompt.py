"""PEFT export of a prompt adapter (PEFT's PROMPT_TUNING or P_TUNING): a model-level adapter, so not the
per-layer path of hf_adapter.py.  Offline: no megatron, no process group.

The checkpoint holds the prompt whole (it is replicated over TP, on the first pipeline stage) under
`prompt_tuning.prompt_embeddings.<adapter>.weight` [n, H].  PEFT's adapter_model.safetensors holds
it under the single key `prompt_embeddings` (get_peft_model_state_dict of a prompt-tuning model);
adapter_config.json gets PEFT's PromptTuningConfig fields with the base model's numbers
(token_dim, num_attention_heads, num_layers) from the HF config.  P-tuning's checkpoint holds its
encoder (`<adapter>.embedding.weight`, `<adapter>.mlp_head.0.weight`, ...); PEFT's file holds the
encoder's output under the same `prompt_embeddings` key (what PEFT's own save writes).
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from parallel_adapters.adapters.prompt import KIND_NAME, PEFT_KEY as PEFT_PROMPT_KEY, TENSOR_PREFIX, peft_config_fields
from parallel_adapters.adapters.p_tuning import encoded_rows
from parallel_adapters.checkpoint.export_prompt_learning import adapter_keys, read_checked, write_peft_files
from parallel_adapters.config import PromptEncoderConfig
from parallel_adapters.hf.config import LlamaShape

PROMPT_PEFT_TYPES = ("PROMPT_TUNING", "P_TUNING")
_KEY = re.compile(rf"^{re.escape(TENSOR_PREFIX)}(?P<adapter>[^.]+)\.(?P<tensor>.+)$")
_P_TUNING_FIELDS = ("encoder_reparameterization_type", "encoder_hidden_size", "encoder_num_layers", "encoder_dropout")


def is_prompt_stored_config(config: Mapping[str, Any] | None) -> bool:
    """A checkpoint's (adapter_kind) or a PEFT adapter_config.json's (peft_type) prompt adapter."""
    if not isinstance(config, Mapping):
        return False
    return config.get("adapter_kind") == KIND_NAME or config.get("peft_type") in PROMPT_PEFT_TYPES


def refuse_merge(config: Mapping[str, Any] | None, source: object) -> None:
    """A prompt adapter has no weight delta: say so instead of failing on its tensors' names."""
    from parallel_adapters.checkpoint.layout import CheckpointError

    if is_prompt_stored_config(config):
        raise CheckpointError(f"{source}: cannot merge a prompt-tuning adapter: it prepends trained virtual tokens to "
                              "the input and changes no weight, so there is nothing to fold into the base (PEFT "
                              "cannot merge prompt learning adapters either); export it with export_peft and run "
                              "the base with it (PeftModel.from_pretrained)")


def prompt_keys(names: list[str], adapter_name: str | None) -> dict[str, str]:
    """{tensor name under the adapter ("weight", or P-tuning's encoder tensors): checkpoint key} of
    the prompt adapter to export; ValueError naming what is there otherwise."""
    return adapter_keys(names, adapter_name, _KEY, "prompt-tuning", f"{TENSOR_PREFIX}<adapter>.<tensor>",
                        "prompt", "prompts")


def peft_prompt_config(adapter_config: Mapping[str, Any], hf_config: Mapping[str, Any], prompt_shape: tuple,
                       base_model_name_or_path: str | None) -> dict:
    """adapter_config.json in PEFT's PromptTuningConfig fields, the base's numbers from its HF config."""
    shape = LlamaShape.from_config(hf_config, "hf_config")
    if prompt_shape[1] != shape.hidden_size:
        raise ValueError(f"the prompt is {list(prompt_shape)}, the HF config's hidden_size is {shape.hidden_size}")
    return peft_config_fields(dict(adapter_config), prompt_shape, shape.num_heads, shape.num_layers,
                              base_model_name_or_path)


def _rows(keys: Mapping[str, str], read: Callable[[str], torch.Tensor], adapter_config: Mapping[str, Any],
          options: Any) -> torch.Tensor:
    """The n rows PEFT saves: the trained table, or P-tuning's encoder output (in float64, cast to
    the encoder's dtype), after the finite check of what the checkpoint holds."""
    tensors = read_checked(keys, read, options.allow_nonfinite)
    if adapter_config.get("peft_type") != "P_TUNING":
        if set(tensors) != {"weight"}:
            raise ValueError(f"a prompt-tuning adapter holds one table, got {sorted(keys.values())}")
        return tensors["weight"]
    known = {f.name for f in dataclasses.fields(PromptEncoderConfig)}
    config = PromptEncoderConfig.from_dict({k: v for k, v in adapter_config.items() if k in known})
    dtype = tensors["embedding.weight"].dtype
    return encoded_rows(config, tensors).to(dtype)


def _p_tuning_fields(adapter_config: Mapping[str, Any], data: dict) -> dict:
    """PEFT's PromptEncoderConfig fields over the shared prompt-learning ones."""
    data = {k: v for k, v in data.items() if not k.startswith(("prompt_tuning_init", "tokenizer_"))}
    data.update({k: adapter_config[k] for k in _P_TUNING_FIELDS}, peft_type="P_TUNING")
    return data


def write_prompt_export(meta: Mapping[str, torch.Tensor], read: Callable[[str], torch.Tensor],
                        adapter_config: Mapping[str, Any], hf_cfg: Mapping[str, Any], tmp: Path,
                        weights_file: str, config_file: str, options: Any) -> None:
    """adapter_model.safetensors ({PEFT_PROMPT_KEY: [n, H]}) and adapter_config.json into `tmp`.
    P-tuning: PEFT saves the encoder's output (its inference mode reads that table, not the
    encoder), so the n rows are computed here from the encoder's tensors."""
    keys = prompt_keys(list(meta), options.adapter_name)
    rows = _rows(keys, read, adapter_config, options)
    config = peft_prompt_config(adapter_config, hf_cfg, tuple(rows.shape), options.base_model_name_or_path)
    if adapter_config.get("peft_type") == "P_TUNING":
        config = _p_tuning_fields(adapter_config, config)
    write_peft_files(tmp, weights_file, config_file, PEFT_PROMPT_KEY, rows.to(options.dtype or rows.dtype), config)
