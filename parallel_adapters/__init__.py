"""parallel_adapters: exact LoRA-family adapters for Megatron-core under TP, PP and DP.

The public API.  Names are imported lazily so that offline tools (export, consolidate) start
without importing megatron.core.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "LoraConfig": "parallel_adapters.config",
    "IA3Config": "parallel_adapters.config",
    "PromptTuningConfig": "parallel_adapters.config",
    "PromptEncoderConfig": "parallel_adapters.config",
    "PrefixTuningConfig": "parallel_adapters.config",
    "LoHaConfig": "parallel_adapters.config",
    "LoKrConfig": "parallel_adapters.config",
    "EvaConfig": "parallel_adapters.config",
    "LoftQConfig": "parallel_adapters.config",
    "CordaConfig": "parallel_adapters.config",
    "ShardSpec": "parallel_adapters.distributed.sharding",
    "ShardedTensor": "parallel_adapters.distributed.sharding",
    "ParallelGroups": "parallel_adapters.distributed.groups",
    "AdapterModel": "parallel_adapters.adapters.model",
    "get_adapter_model": "parallel_adapters.adapters.model",
    "AdapterHost": "parallel_adapters.adapters.hosts.base",
    "ColumnParallelHost": "parallel_adapters.adapters.hosts.linear",
    "RowParallelHost": "parallel_adapters.adapters.hosts.linear",
    "ReplicatedHost": "parallel_adapters.adapters.hosts.linear",
    "AdapterKind": "parallel_adapters.adapters.kinds.protocol",
    "register_kind": "parallel_adapters.adapters.kinds",
    "get_eva_state_dict": "parallel_adapters.eva.initialize",
    "get_eva_layer_states": "parallel_adapters.eva.initialize",
    "initialize_eva_weights": "parallel_adapters.eva.initialize",
    "save_checkpoint": "parallel_adapters.checkpoint.adapter_io",
    "load_checkpoint": "parallel_adapters.checkpoint.adapter_io",
    "export_peft": "parallel_adapters.checkpoint.export",
    "export_peft_from_checkpoint": "parallel_adapters.checkpoint.export",
    "merge_into_hf": "parallel_adapters.checkpoint.merge",
    "gpt_settings_from_hf": "parallel_adapters.mcore.hf_bridge",
    "gpt_config_from_hf": "parallel_adapters.mcore.hf_bridge",
    "import_hf_checkpoint": "parallel_adapters.mcore.hf_bridge",
    "export_hf_checkpoint": "parallel_adapters.mcore.hf_bridge",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'parallel_adapters' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
