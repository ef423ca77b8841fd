"""Resuming a run: the engine built with the checkpoint's adapter weights, optimizer state and RNG
restored, after checking that the checkpoint was written by the same engine and data layout."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from parallel_adapters.train.run_config import RunConfig
from parallel_adapters.train.validate import Layout


def engine_and_state(config: RunConfig, model: Any, layout: Layout, resume_from: Path | None,
                      tp_sum: str) -> tuple[Any, dict]:
    """The engine with the checkpoint restored into model and optimizer; the saved extra_state.

    DeepSpeed: the adapter weights are loaded BEFORE deepspeed.initialize (ZeRO-3 partitions them
    there), ZeRO's optimizer state after, from the checkpoint's per-rank safetensors + JSON
    (train/zero_state.py; nothing is unpickled)."""
    from parallel_adapters.checkpoint.adapter_io import load_checkpoint, restore_all_rng
    from parallel_adapters.checkpoint.sharded import load_train_state
    from parallel_adapters.distributed.agreement import agreed
    from parallel_adapters.train import zero_state
    from parallel_adapters.train.engine import build_engine
    from parallel_adapters.train.loop import restore_dropout_counters

    extra: dict = {}
    if resume_from is not None and config.deepspeed is not None:
        extra = load_checkpoint(model, resume_from, None, restore_rng=False) or {}
    engine = build_engine(model, **engine_arguments(config, layout), tp_sum=tp_sum)
    if config.deepspeed is not None and (resume_from is not None or config.checkpoint.directory is not None):
        zero_state.check_checkpointing(engine)  # before training, not at the first save
    if resume_from is None:
        return engine, extra
    if config.deepspeed is None:
        extra = load_checkpoint(model, resume_from, engine.checkpoint_optimizer()) or {}
    _check_same_engine(extra, engine.name, config, resume_from)
    _check_same_experts(extra, layout, resume_from)
    if config.deepspeed is not None:
        def restore() -> Any:
            optim_state, rng, _ = load_train_state(resume_from, model.groups)
            zero_state.restore(engine, optim_state or {}, str(resume_from))
            return rng

        rng = agreed(restore, f"resume from {resume_from}")  # a failure on any rank stops every rank
        if rng is not None:
            restore_all_rng(model, rng)
    _check_same_data(extra, layout, config, resume_from)
    restore_dropout_counters(model, extra.get("adapter_dropout_calls", extra.get("lora_dropout_calls")))  # older saves
    return engine, extra


def engine_arguments(config: RunConfig, layout: Layout) -> dict[str, Any]:
    """train.engine.build_engine's keyword arguments from the run config (pure)."""
    o = config.optim
    return dict(lr=o.lr, weight_decay=o.weight_decay, grad_clip=o.grad_clip, deepspeed_json=config.deepspeed,
                micro_batch=layout.micro_batch * layout.accumulation, micro_batches=layout.accumulation)


def _check_same_engine(extra: dict, engine: str, config: RunConfig, resume_from: Path) -> None:
    if extra.get("engine") != engine:
        raise ValueError(f"resume: {resume_from} was written by the {extra.get('engine')!r} engine, "
                         f"this run uses {engine!r} (deepspeed: {config.deepspeed})")


def _check_same_data(extra: dict, layout: Layout, config: RunConfig, resume_from: Path) -> None:
    """The saved data position counts global batches of one size and sequence length."""
    for key, now in (("optim.global_batch", layout.global_batch), ("data.seq_len", config.data.seq_len)):
        saved = extra.get(key)
        if saved is not None and saved != now:
            raise ValueError(f"resume: {resume_from} was trained with {key}={saved}, this run has {key}={now}; "
                             "the data position would not continue the same sample order")


def _check_same_experts(extra: dict, layout: Layout, resume_from: Path) -> None:
    """The per-rank optimizer state holds each EP rank's own experts, split over expert-TP: it
    does not carry over to another EP / ETP size (the TP/PP/DP check cannot see it)."""
    keys = ("parallel.expert", "parallel.expert_tensor")
    saved = tuple(extra.get(k) for k in keys)
    now = (layout.expert, layout.expert_tensor or layout.tensor)
    if None not in saved and saved != now:
        raise ValueError(
            f"resume: {resume_from} was trained with parallel.expert={saved[0]}, parallel.expert_tensor={saved[1]}; "
            f"this run has parallel.expert={now[0]}, parallel.expert_tensor={now[1]}: each rank's optimizer state "
            "holds its own experts' slices and cannot be resharded; resume at the saved layout (the adapter "
            "weights alone reshard: consolidate --expert-tp, or load_checkpoint without an optimizer)")
