"""Prompt learning in training runs: `adapter.kind: prompt_tuning | p_tuning` (PEFT's
PromptTuningConfig / PromptEncoderConfig, adapters/prompt.py and adapters/p_tuning.py).

What a run needs beyond the per-layer kinds:
- the run-config keys: PEFT's fields that the run reads; those the model decides (token_dim,
  num_attention_heads, num_layers) or that have one supported value (num_transformer_submodules,
  inference_mode, peft_type, task_type) are refused, naming the kind and the field;
- DeepSpeed with parallel.pipeline > 1 is refused at validation (PP alone and DeepSpeed alone train);
- the sequence-length rule: the forward runs n + data.seq_len positions, which under sequence
  parallelism must divide by parallel.tensor (refused at validation, before any process group;
  nothing is padded in training);
- the loss targets: PEFT's causal-LM loss of the prompted forward (`prompted_targets`).

Legend: b batch, T = data.seq_len real tokens, n virtual tokens.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from parallel_adapters.adapters.prompt import IGNORE_INDEX, is_prompt_config, megatron_targets
from parallel_adapters.config import PromptEncoderConfig, PromptTuningConfig

PROMPT_KINDS: dict[str, type] = {"prompt_tuning": PromptTuningConfig, "p_tuning": PromptEncoderConfig}
"""`adapter.kind` of the prompt-learning configs."""
NOT_RUN_KEYS: dict[str, str] = {
    "token_dim": "the model's hidden size decides it", "num_attention_heads": "the model decides it",
    "num_layers": "the model decides it", "num_transformer_submodules": "a GPT has one (the export writes 1)",
    "inference_mode": "a run trains (the export writes true)", "peft_type": "adapter.kind decides it",
    "task_type": "CAUSAL_LM is the only task (the export writes it)",
}
"""Fields of the prompt configs that a run config may not set, and why."""


def refuse_not_run_keys(kind: str, keys: Any, path: str) -> None:
    """ValueError naming `path.<field>` and the kind for a prompt config field a run does not take."""
    if kind not in PROMPT_KINDS:
        return
    bad = [k for k in keys if k in NOT_RUN_KEYS]
    if bad:
        raise ValueError(f"{path}.{bad[0]} is not a run-config key of adapter kind {kind!r}: {NOT_RUN_KEYS[bad[0]]}; "
                         f"remove {', '.join(f'{path}.{k}' for k in bad)}")


def num_virtual_tokens(adapter: Any) -> int:
    """n of a prompt-learning adapter config, 0 for any other kind."""
    return int(adapter.num_virtual_tokens) if is_prompt_config(adapter) else 0


def check_sequence_split(config: Any) -> None:
    """Under sequence parallelism the embedding's reduce-scatter splits n + data.seq_len positions
    over parallel.tensor ranks: ValueError naming the three numbers when they do not divide."""
    p, seq_len = config.parallel, config.data.seq_len
    if not p.sequence_parallel or p.tensor == 1:
        return
    n = num_virtual_tokens(config.adapter)
    if n == 0 and seq_len % p.tensor:
        raise ValueError(f"data.seq_len={seq_len} must divide by parallel.tensor={p.tensor} "
                         "with parallel.sequence_parallel")
    if n and (n + seq_len) % p.tensor:
        raise ValueError(f"adapter.num_virtual_tokens={n} + data.seq_len={seq_len} = {n + seq_len} positions must "
                         f"divide by parallel.tensor={p.tensor} with parallel.sequence_parallel (the forward runs "
                         "the virtual tokens and the real ones as one sequence); change one of them")


def validate_prompt_run(config: Any) -> None:
    """The checks of a prompt-learning run that need no process group."""
    n = num_virtual_tokens(config.adapter)
    if n == 0:
        return
    if config.deepspeed is not None and config.parallel.pipeline > 1:
        raise ValueError(f"deepspeed with parallel.pipeline={config.parallel.pipeline}: adapter.kind={_kind(config)!r} "
                         "trains under PP with the torch engine only (deepspeed: null): the DeepSpeed engine "
                         "cannot drive Megatron's pipeline schedule, and the stages after the first hold no prompt "
                         "tensor for ZeRO to partition")
    m = config.model
    if m.hf_checkpoint is None and n + config.data.seq_len > m.max_position_embeddings:
        raise ValueError(f"adapter.num_virtual_tokens={n} + data.seq_len={config.data.seq_len} exceeds "
                         f"model.max_position_embeddings={m.max_position_embeddings}")
    a = config.adapter
    if isinstance(a, PromptTuningConfig) and a.prompt_tuning_init == "TEXT" and a.init_token_ids is None \
            and not a.tokenizer_name_or_path:
        raise ValueError("adapter.prompt_tuning_init=TEXT needs adapter.tokenizer_name_or_path (to tokenise "
                         "adapter.prompt_tuning_init_text) or adapter.init_token_ids")


def _kind(config: Any) -> str:
    return next(k for k, cls in PROMPT_KINDS.items() if isinstance(config.adapter, cls))


def with_init_ids(adapter: Any) -> Any:
    """A TEXT prompt-tuning config with its text tokenised into init_token_ids (as PEFT does at
    init); any other config unchanged."""
    if not isinstance(adapter, PromptTuningConfig) or adapter.prompt_tuning_init != "TEXT" \
            or adapter.init_token_ids is not None:
        return adapter
    from parallel_adapters.interop.hf_tokenizer import tokenize_prompt_text

    ids = tokenize_prompt_text(adapter.prompt_tuning_init_text, adapter.tokenizer_name_or_path,
                               adapter.tokenizer_kwargs)
    return adapter.replace(init_token_ids=tuple(ids))


def stored_prompt_config(saved: Mapping[str, Any]) -> Any:
    """A checkpoint's prompt-learning config (adapter_kind prompt_tuning; peft_type tells which)."""
    cls = PromptEncoderConfig if saved.get("peft_type") == "P_TUNING" else PromptTuningConfig
    return cls.from_dict(dict(saved))


def prompted_targets(input_ids: torch.Tensor, labels: torch.Tensor, n: int) -> torch.Tensor:
    """The run's targets [b, n + T] for the prompted logits [b, n + T, V] (position q predicts
    targets[q], IGNORE_INDEX where nothing counts), such that the summed cross entropy over them
    divided by their count is PEFT's loss `PeftModel(input_ids=x, labels=u).loss` with u = PEFT's
    (unshifted) labels of the batch: u[0] = x[0] (the last virtual position predicts the first real
    token, as PEFT's loss with labels = input_ids does), u[p] = labels[p - 1] (the data's shifted
    labels with their mask).  The data's last label (the token after the sample) has no position
    in PEFT's loss and is left out."""
    peft_labels = torch.cat([input_ids[:, :1], labels[:, :-1]], dim=1)
    targets, mask = megatron_targets(peft_labels, n)
    return targets.masked_fill(mask == 0, IGNORE_INDEX)


def prompted_batches(model: Any, microbatches: list[dict]) -> list[dict]:
    """Micro-batches whose labels are the prompted targets when the model prepends virtual tokens
    (`prepended_tokens`, recorded on every pipeline stage); unchanged otherwise."""
    n = int(getattr(model.model, "prepended_tokens", 0))
    if n == 0:
        return microbatches
    return [{**mb, "labels": prompted_targets(mb["input_ids"], mb["labels"], n)} for mb in microbatches]
