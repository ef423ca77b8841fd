"""Prefix tuning in training runs: `adapter.kind: prefix_tuning` (PEFT's PrefixTuningConfig,
adapters/prefix.py).

Unlike prompt tuning nothing is prepended to the sequence: the forward runs data.seq_len
positions (RoPE positions n..n+T-1) and the loss is the base model's causal-LM loss, so the data,
the sequence-parallel split and evaluate's logits ([len_i, vocab], as PeftModel's) are the base
model's.  What a run needs beyond that: the run-config keys (the model-decided fields refused,
naming the field), the checks below, and the checkpoint's config for resume / evaluate.
"""
from __future__ import annotations

from typing import Any, Mapping

from parallel_adapters.config import PrefixTuningConfig

PREFIX_KINDS: dict[str, type] = {"prefix_tuning": PrefixTuningConfig}
"""`adapter.kind` of prefix tuning."""
NOT_RUN_KEYS: dict[str, str] = {
    "token_dim": "the model decides it (KV heads x head_dim, PEFT's GQA rule)",
    "num_attention_heads": "the model decides it (its KV heads, PEFT's GQA rule)",
    "num_layers": "the model decides it", "num_transformer_submodules": "a GPT has one (the export writes 1)",
    "inference_mode": "a run trains (the export writes true)", "peft_type": "adapter.kind decides it",
    "task_type": "CAUSAL_LM is the only task (the export writes it)",
}


def refuse_not_run_keys(kind: str, keys: Any, path: str) -> None:
    """ValueError naming `path.<field>` for a PrefixTuningConfig field a run does not take."""
    bad = [k for k in keys if k in NOT_RUN_KEYS] if kind in PREFIX_KINDS else []
    if bad:
        raise ValueError(f"{path}.{bad[0]} is not a run-config key of adapter kind {kind!r}: {NOT_RUN_KEYS[bad[0]]}; "
                         f"remove {', '.join(f'{path}.{k}' for k in bad)}")


def validate_prefix_run(config: Any) -> None:
    """The checks of a prefix-tuning run that need no process group."""
    if not isinstance(config.adapter, PrefixTuningConfig):
        return
    if config.deepspeed is not None and config.parallel.pipeline > 1:
        raise ValueError(f"deepspeed with parallel.pipeline={config.parallel.pipeline}: adapter.kind='prefix_tuning' "
                         "trains under PP with the torch engine only (deepspeed: null): the DeepSpeed engine cannot "
                         "drive Megatron's pipeline schedule")
    m, n = config.model, config.adapter.num_virtual_tokens
    if m.hf_checkpoint is None and n + config.data.seq_len > m.max_position_embeddings:
        raise ValueError(f"adapter.num_virtual_tokens={n} + data.seq_len={config.data.seq_len} exceeds "
                         f"model.max_position_embeddings={m.max_position_embeddings} (the real tokens sit at "
                         "RoPE positions n..n+T-1)")


def stored_prefix_config(saved: Mapping[str, Any]) -> PrefixTuningConfig:
    """A checkpoint's prefix-tuning config (adapter_kind prefix_tuning)."""
    return PrefixTuningConfig.from_dict(dict(saved))
