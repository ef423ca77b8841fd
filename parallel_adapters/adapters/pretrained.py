"""PEFT's `save_pretrained` / `from_pretrained` for an AdapterModel in one process (TP = PP = 1).

The directory is the one PEFT writes and reads: `adapter_model.safetensors` with keys
`base_model.model.<module>.lora_A.weight` (the adapter name left out, as PEFT saves it) and
`adapter_config.json` (PEFT's LoraConfig fields, `peft_type` "LORA"; a prompt adapter: PEFT's
`prompt_embeddings` and PROMPT_TUNING fields; a P-tuning adapter: the encoder's output as
`prompt_embeddings` and P_TUNING fields; a prefix adapter: PEFT's `prompt_embeddings`
[n, 2 L D] and PREFIX_TUNING fields; prompt and prefix adapters load at any TP / PP); adapters other than
"default" go to a sub-directory of their name.  Only the factors travel (no trained biases or
modules_to_save).  Sharded (TP/PP) models use the sharded checkpoints (`save_checkpoint`) and
`export_peft` instead.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from parallel_adapters.adapters import p_tuning, prefix, prompt
from parallel_adapters.adapters.prefix_encoder import peft_config_fields as prefix_config_fields
from parallel_adapters.config import (
    EvaConfig, IA3Config, LoHaConfig, LoKrConfig, LoraConfig, PrefixTuningConfig, PromptEncoderConfig,
    PromptTuningConfig,
)

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
_OUR_ONLY = {"seed", "fused_parts", "conv_layout"}  # our config fields that PEFT's configs do not have
_OTHER_KINDS = {"IA3": IA3Config, "LOHA": LoHaConfig, "LOKR": LoKrConfig}
"""peft_type -> our config, for the kinds beyond LoRA (their fields are PEFT's)."""
_OTHER_UNSUPPORTED = {"IA3": {"fan_in_fan_out": False}, "LOHA": {}, "LOKR": {}}
_PEFT_EVA = {"rho", "tau", "use_label_mask", "label_mask_value", "whiten", "adjust_scaling_factors"}
_UNSUPPORTED = {"use_dora": False, "fan_in_fan_out": False, "lora_bias": False, "use_qalora": False}
"""PEFT fields whose other values change the adapter's math: loading refuses them."""


def adapter_directory(directory: str | Path, adapter_name: str) -> Path:
    return Path(directory) if adapter_name == "default" else Path(directory) / adapter_name


def peft_config_dict(config: Any) -> dict[str, Any]:
    """adapter_config.json: our config in PEFT's fields (PEFT's LoraConfig / IA3Config /
    LoHaConfig loads it).  IA3's fused_parts has no PEFT field; an adapter covering only parts of a
    fused module is refused by `_peft_tensors`."""
    data = {k: v for k, v in config.to_dict().items() if k not in _OUR_ONLY}
    if data.get("eva_config") is not None:
        data["eva_config"] = {k: v for k, v in data["eva_config"].items() if k in _PEFT_EVA}
    if data.get("corda_config") is not None:  # calibration_batches is a train-run field only
        data["corda_config"] = {k: v for k, v in data["corda_config"].items() if k != "calibration_batches"}
    peft_type = next((t for t, cls in _OTHER_KINDS.items() if isinstance(config, cls)), "LORA")
    data.update(peft_type=peft_type, task_type=None, base_model_name_or_path=None, inference_mode=True)
    return data


def config_from_peft_dict(data: dict[str, Any], source: str) -> LoraConfig:
    """A LoraConfig from PEFT's adapter_config.json fields (PEFT's other bookkeeping fields are
    ignored; fields that would change the adapter's math are refused, naming them)."""
    peft_type = data.get("peft_type", "LORA")
    if peft_type == "PROMPT_TUNING":
        known = {f.name for f in dataclasses.fields(PromptTuningConfig)}
        return PromptTuningConfig.from_dict({k: v for k, v in data.items() if k in known})
    if peft_type == "P_TUNING":
        known = {f.name for f in dataclasses.fields(PromptEncoderConfig)} - {"inference_mode"}
        return PromptEncoderConfig.from_dict({k: v for k, v in data.items() if k in known})
    if peft_type == "PREFIX_TUNING":  # the model-decided fields are checked against the model
        known = {f.name for f in dataclasses.fields(PrefixTuningConfig)} - {"inference_mode"}
        return PrefixTuningConfig.from_dict({k: v for k, v in data.items() if k in known})
    if peft_type in _OTHER_KINDS:
        cls = _OTHER_KINDS[peft_type]
        bad = {k: data[k] for k, default in _OTHER_UNSUPPORTED[peft_type].items() if data.get(k, default) != default}
        if bad:
            raise ValueError(f"{source}: unsupported {peft_type} settings {bad}")
        known = {f.name for f in dataclasses.fields(cls)} - _OUR_ONLY
        kept = {k: v for k, v in data.items() if k in known}
        return cls.from_dict({**kept, "fused_parts": {}} if cls is IA3Config else kept)
    if peft_type != "LORA":
        raise ValueError(f"{source}: peft_type {peft_type!r}; LORA, IA3, LOHA, LOKR, PROMPT_TUNING, P_TUNING and "
                         "PREFIX_TUNING adapters load")
    bad = {k: data[k] for k, default in _UNSUPPORTED.items() if data.get(k, default) not in (default, None)}
    if bad:
        raise ValueError(f"{source}: unsupported LoRA settings {bad}")
    known = {f.name for f in dataclasses.fields(LoraConfig)}
    kept = {k: v for k, v in data.items() if k in known}
    if isinstance(kept.get("eva_config"), dict):
        eva_known = {f.name for f in dataclasses.fields(EvaConfig)}
        kept["eva_config"] = EvaConfig(**{k: v for k, v in kept["eva_config"].items() if k in eva_known})
    return LoraConfig.from_dict(kept)


def save_pretrained(model: Any, directory: str | Path, selected_adapters: list[str] | None = None) -> None:
    """Write each selected adapter (default: all) in PEFT's format; one process only."""
    _require_one_process(model, "save_pretrained")
    for name in selected_adapters or list(model.peft_config):
        model._require(name)
        out = adapter_directory(directory, name)
        out.mkdir(parents=True, exist_ok=True)
        tensors = _peft_tensors(model, name)
        config = model.peft_config[name]
        if prompt.is_prompt_config(config):
            base = getattr(model.model, "config", None)
            data = prompt.peft_config_fields(config.to_dict(), tuple(tensors[prompt.PEFT_KEY].shape),
                                             getattr(base, "num_attention_heads", None),
                                             getattr(base, "num_layers", None), None)
            if isinstance(config, PromptEncoderConfig):
                data = p_tuning.peft_config_fields(config.to_dict(), data)
        elif prefix.is_prefix_config(config):  # with the model-decided fields filled in
            resolved = prefix.prefix_module(model.model).configs[name]
            data = prefix_config_fields(resolved.to_dict(), tuple(tensors[prompt.PEFT_KEY].shape),
                                        resolved.num_attention_heads, resolved.num_layers, None)
        else:
            data = peft_config_dict(config)
        save_file(tensors, str(out / WEIGHTS_FILE))
        (out / CONFIG_FILE).write_text(json.dumps(data, indent=2) + "\n")


def loadable_config(config: Any, is_trainable: bool) -> Any:
    """What from_pretrained builds for `config`: a prefix_projection adapter loads frozen as the
    table PEFT saved (the MLP's output), as PEFT's inference mode; trainable, it is refused.  So
    does a P-tuning adapter: its file holds the encoder's output, which PEFT's inference mode
    prepends as it is; here a frozen PromptTuningConfig table of those rows."""
    if isinstance(config, PromptEncoderConfig):
        if is_trainable:
            raise ValueError("from_pretrained(is_trainable=True) of a P-tuning adapter: PEFT's file holds the "
                             "encoder's output, the encoder cannot be recovered from it (PEFT refuses it too); load "
                             "it frozen, or resume the run's checkpoint")
        return PromptTuningConfig(num_virtual_tokens=config.num_virtual_tokens, token_dim=config.token_dim,
                                  num_attention_heads=config.num_attention_heads, num_layers=config.num_layers,
                                  seed=config.seed)
    if not (prefix.is_prefix_config(config) and config.prefix_projection):
        return config
    if is_trainable:
        raise ValueError("from_pretrained(is_trainable=True) of a prefix adapter with prefix_projection: PEFT's file "
                         "holds the MLP's output, the MLP cannot be recovered from it (PEFT refuses it too); load it "
                         "frozen, or resume the run's checkpoint")
    return config.replace(prefix_projection=False)


def read_config(directory: str | Path, adapter_name: str) -> LoraConfig:
    path = adapter_directory(directory, adapter_name) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no adapter_config.json (written by save_pretrained)")
    return config_from_peft_dict(json.loads(path.read_text()), str(path))


@torch.no_grad()
def load_adapter_weights(model: Any, directory: str | Path, adapter_name: str) -> None:
    """Copy the saved tensors of `adapter_name` into `model`; every expected key must be there."""
    path = adapter_directory(directory, adapter_name) / WEIGHTS_FILE
    saved = load_file(str(path))
    if prefix.is_prefix_config(model.peft_config[adapter_name]):
        if prompt.PEFT_KEY not in saved:
            raise ValueError(f"{path}: missing tensors {[prompt.PEFT_KEY]}")
        prefix.load_peft_prompt_embeddings(model.model, adapter_name, saved[prompt.PEFT_KEY], str(path))
        return
    targets = _peft_tensors(model, adapter_name, live=True)
    missing = sorted(set(targets) - set(saved))
    if missing:
        raise ValueError(f"{path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for key, param in targets.items():
        if tuple(saved[key].shape) != tuple(param.shape):
            raise ValueError(f"{path}: {key} has shape {tuple(saved[key].shape)}, the model needs {tuple(param.shape)}")
        param.copy_(saved[key])


def _peft_tensors(model: Any, adapter_name: str, live: bool = False) -> dict[str, torch.Tensor]:
    """PEFT's keys -> this adapter's tensors (the parameters themselves when `live`, else
    contiguous detached copies for the file)."""
    config = model.peft_config[adapter_name]
    if isinstance(config, PromptEncoderConfig):  # saving only: from_pretrained loads the rows as a table
        if live:
            raise ValueError(f"adapter {adapter_name!r}: a P-tuning encoder cannot be loaded from PEFT's file (it "
                             "holds the encoder's output); from_pretrained loads it as a frozen table")
        encoder = prompt.prompt_module(model.model).params(adapter_name)
        dtype = encoder["embedding.weight"].dtype
        return {prompt.PEFT_KEY: p_tuning.encoded_rows(config, {k: v.detach().cpu() for k, v in encoder.items()})
                .to(dtype).contiguous()}
    if prefix.is_prefix_config(config):  # saving only: loading slices the table per rank
        return {prompt.PEFT_KEY: prefix.peft_prompt_embeddings(model.model, adapter_name)}
    if prompt.is_prompt_config(config):
        tensor = prompt.prompt_module(model.model).tensor(adapter_name)
        return {prompt.PEFT_KEY: tensor if live else tensor.detach().contiguous().clone()}
    if config.bias != "none" or config.modules_to_save:
        raise ValueError(f"adapter {adapter_name!r}: save_pretrained / from_pretrained carry the adapter factors "
                         "only, not trained biases or modules_to_save; use save_checkpoint / load_checkpoint")
    out: dict[str, torch.Tensor] = {}
    for _, layer in model.adapter_layers():
        if layer.has_adapter(adapter_name):
            kind = layer.kinds[adapter_name]
            if kind.hf_parts(layer.hparams(adapter_name)) is not None:
                raise ValueError(f"{layer.module_name}: adapter {adapter_name!r} covers only parts of a fused module "
                                 "(IA3Config.fused_parts); save_checkpoint then export_peft splits it into PEFT's "
                                 "modules")
            for tensor_name, param in layer.adapter_tensors(adapter_name).items():
                out[f"{PEFT_PREFIX}{layer.module_name}.{kind.peft_key(tensor_name)}"] = param
    return out if live else {k: v.detach().contiguous().clone() for k, v in out.items()}


def _require_one_process(model: Any, what: str) -> None:
    g = model.groups
    if g.tp_size > 1 or g.pp_size > 1:
        raise ValueError(f"{what} writes whole tensors from one process (TP={g.tp_size}, PP={g.pp_size}); "
                         "use save_checkpoint, then export_peft, for a sharded model")
