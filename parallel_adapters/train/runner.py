"""`run_training(config)`: a whole LoRA fine-tune inside an already-launched torchrun process.

    torchrun --standalone --nproc_per_node 2 -m parallel_adapters train configs/tiny.yaml \\
        [optim.steps=20 ...] [--resume | --resume-from DIR | --no-resume]

(`-m parallel_adapters.train.runner --config CONFIG ...` is the same command.)

Order, and why: validate the config (no process group needed), start the process group, check the
layout against its world size, all BEFORE Megatron is imported or anything is built (a bad key or
an impossible TP x PP fails in seconds, naming the field, not after a model load); then build the
base model (GPT settings, or a Hugging Face import), the adapters (from the checkpoint's adapter
config when resuming, so EVA-chosen ranks come back), EVA if asked and not resuming, the data, the
engine; restore the checkpoint; train; save; export.  Without a flag, a run whose
checkpoint.directory has a `latest` resumes from it (a relaunched job continues by itself).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from parallel_adapters.config import LoraConfig
from parallel_adapters.train.data import ByteTokenizer, DataPosition, default_corpus_path, load_texts, pack
from parallel_adapters.distributed.agreement import on_rank0
from parallel_adapters.train.cli_args import add_train_arguments
from parallel_adapters.train.eva_run import run_corda, run_eva
from parallel_adapters.train.lr import LRSchedule
from parallel_adapters.train.run_config import RunConfig, adapter_kind_name, load_run_config
from parallel_adapters.train.process_group import init_distributed
from parallel_adapters.train.prefix_run import stored_prefix_config
from parallel_adapters.train.prompt_run import stored_prompt_config, with_init_ids
from parallel_adapters.train.resume import engine_and_state
from parallel_adapters.train.run_directory import hold_checkpoint_directory, resolve_resume
from parallel_adapters.train.validate import Layout, check_parallel_layout, validate_run_config  # noqa: F401
from parallel_adapters.user_errors import alike_on_every_rank, run_command

DEFAULT_TIMEOUT_S = 1800.0


@dataclass
class TrainResult:
    """What a run did, on this rank (the loss values are global, identical on every rank)."""

    losses: list[float] = field(default_factory=list)
    grad_norms: list[float | None] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    start_step: int = 0
    final_step: int = 0
    tokens_per_s: float = 0.0
    eva_steps: int | None = None
    """The batches EVA consumed (its steps), when EVA ran."""
    resumed_from: str | None = None
    last_checkpoint: str | None = None
    export_dir: str | None = None
    metrics_path: str | None = None
    ranks: dict[str, int] = field(default_factory=dict)
    peft_max_logit_diff: float | None = None
    """export.verify_with_peft: max |PEFT logits - Megatron logits| (at most peft_logit_limit)."""
    peft_logit_limit: float | None = None
    """The limit that difference was checked against (train.finish.peft_tolerance: 1e-4 on a float32
    base with logits up to 10)."""
    adapter_shards: dict[str, Any] | None = None
    """With return_adapter_shards=True: this rank's adapter tensors (ShardedTensor) after training."""


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------

def tokenizer_kind(config: RunConfig) -> str:
    """data.tokenizer with "auto" resolved: "hf" when model.hf_checkpoint is set, else "byte"."""
    kind = config.data.tokenizer
    if kind == "auto":
        kind = "hf" if config.model.hf_checkpoint else "byte"
    return kind


def _tokenizer(config: RunConfig) -> tuple[Any, int, int]:
    """(encode function, eos id, vocab size) of data.tokenizer."""
    if tokenizer_kind(config) == "byte":
        tok = ByteTokenizer()
        return tok.encode, tok.eos_id, tok.vocab_size
    from parallel_adapters.interop.hf_tokenizer import load_hf_tokenizer

    return load_hf_tokenizer(config.model.hf_checkpoint)


def build_samples(config: RunConfig) -> tuple[torch.Tensor, int]:
    """Packed [N, 2, seq_len] samples (inputs, labels) and the tokenizer's vocabulary size."""
    encode, eos_id, vocab = _tokenizer(config)
    texts = load_texts(config.data.paths or [default_corpus_path()])
    return pack([encode(t) for t in texts], config.data.seq_len, eos_id), vocab


def gpt_settings(config: RunConfig, tp: int) -> Any:
    """GPTSettings from config.model (or the HF checkpoint's config.json)."""
    from parallel_adapters.mcore.gpt import GPTSettings

    m, sp = config.model, config.parallel.sequence_parallel
    pad = math.lcm(8, tp)  # zero rows, sliced off the logits: any multiple of TP is the same model
    common = dict(sequence_parallel=sp, vocab_pad_multiple=pad, params_dtype=getattr(torch, m.dtype),
                  recompute=m.recompute, hidden_dropout=m.hidden_dropout)
    if m.attention_dropout is not None:
        common["attention_dropout"] = m.attention_dropout
    moe = config.moe  # validate_run_config refused the keys config.json decides, and any on a dense model
    common.update(moe_aux_loss_coeff=moe.aux_loss_coeff, moe_router_dtype=moe.router_dtype,
                  moe_token_dispatcher_type=moe.dispatcher, moe_expert_capacity_factor=moe.capacity_factor,
                  moe_token_drop_policy=moe.drop_policy)
    if m.hf_checkpoint is not None:
        from parallel_adapters.mcore.hf_bridge import gpt_settings_from_hf

        return gpt_settings_from_hf(m.hf_checkpoint, **common)
    return GPTSettings(num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
                       num_attention_heads=m.num_attention_heads, num_query_groups=m.num_query_groups,
                       vocab_size=m.vocab_size, max_position_embeddings=m.max_position_embeddings,
                       rotary_base=m.rotary_base, tie_embeddings=m.tie_embeddings, seed=m.init_seed,
                       num_moe_experts=moe.num_experts, moe_router_topk=moe.topk,
                       moe_ffn_hidden_size=moe.ffn_hidden_size, moe_grouped_gemm=moe.grouped_gemm, **common)


def adapter_config(config: RunConfig, resume_from: Path | None) -> Any:
    """The run's adapter config (`adapter.kind`'s).  An `eva:` section turns EVA on and configures
    it, whatever adapter.init_lora_weights says (validate_run_config refuses a differing
    adapter.eva_config, and EVA with another kind).  When resuming, the checkpoint's (EVA may have
    changed the ranks), of the checkpoint's kind, after checking that the run config asks for the
    same adapter."""
    if resume_from is not None:
        stored = _stored_adapter_config(resume_from)
        _check_same_adapter(stored, with_init_ids(config.adapter), resume_from)
        return _weights_from_checkpoint(stored)
    if config.eva is not None:
        return config.adapter.replace(init_lora_weights="eva", eva_config=config.eva)
    return with_init_ids(config.adapter)  # a TEXT prompt's text tokenised, as PEFT's init does


def saved_adapter_config(checkpoint: Path) -> Any:
    """A checkpoint's adapter config, to build the adapters its weights are then loaded into
    (evaluate): the run config's adapter section does not apply."""
    return _weights_from_checkpoint(_stored_adapter_config(checkpoint))


def _weights_from_checkpoint(stored: Any) -> Any:
    """LoRA: no EVA or other init to run again (the weights come from the checkpoint)."""
    return stored.replace(init_lora_weights=True, eva_config=None) if isinstance(stored, LoraConfig) else stored


def _stored_adapter_config(checkpoint: Path) -> Any:
    """The config of the checkpoint's kind (`adapter_kind`; LoRA before kinds were recorded)."""
    from parallel_adapters.adapters.kinds import kind_for_stored_config
    from parallel_adapters.checkpoint.adapter_io import CHECKPOINT_ONLY_KEYS

    saved = json.loads((checkpoint / "adapter_config.json").read_text())
    if saved.get("adapter_kind") == "prompt_tuning":  # a model-level adapter (no kinds registry entry)
        return stored_prompt_config({k: v for k, v in saved.items() if k not in CHECKPOINT_ONLY_KEYS})
    if saved.get("adapter_kind") == "prefix_tuning":
        return stored_prefix_config({k: v for k, v in saved.items() if k not in CHECKPOINT_ONLY_KEYS})
    cls = kind_for_stored_config({"adapter_kind": saved.get("adapter_kind", "lora")}).config_class
    return cls.from_dict({k: v for k, v in saved.items() if k not in CHECKPOINT_ONLY_KEYS})


def _check_same_adapter(saved: Any, asked: Any, resume_from: Path) -> None:
    """A resumed run takes its adapters from the checkpoint: an adapter.* key that differs would be
    ignored, so it is refused.  The initialisation (init_lora_weights, eva_config) and what EVA
    decided (rank/alpha_pattern; target_modules, when it dropped a layer) are the checkpoint's own."""
    if type(saved) is not type(asked):
        raise ValueError(f"resume: {resume_from} holds a {adapter_kind_name(saved)!r} adapter, the run config has "
                         f"adapter.kind={adapter_kind_name(asked)!r}; a resumed run keeps the checkpoint's adapters "
                         "(or start fresh: --no-resume)")
    skip = {"init_lora_weights", "eva_config"}
    if getattr(saved, "init_lora_weights", None) == "eva":
        skip |= {"rank_pattern", "alpha_pattern", "target_modules"}
    for f in dataclasses.fields(saved):
        if f.name not in skip and getattr(saved, f.name) != getattr(asked, f.name):
            raise ValueError(f"resume: {resume_from} was trained with adapter.{f.name}="
                             f"{getattr(saved, f.name)!r}, the run config has {getattr(asked, f.name)!r}; "
                             "a resumed run keeps the checkpoint's adapters (or start fresh: --no-resume)")


def build_model(config: RunConfig, groups: Any, lora: Any, rank0: bool) -> tuple[Any, Any]:
    """(AdapterModel, GPTSettings): the base GPT (HF weights imported when configured) + adapters."""
    from parallel_adapters.adapters.model import get_adapter_model
    from parallel_adapters.mcore.gpt import build_gpt

    settings = gpt_settings(config, groups.tp_size)
    base = build_gpt(settings, init_weights=config.model.hf_checkpoint is None)  # an import sets every weight
    if config.model.hf_checkpoint is not None:
        from parallel_adapters.mcore.hf_bridge import import_hf_checkpoint

        import_hf_checkpoint(base, config.model.hf_checkpoint, groups, progress=rank0)
    return get_adapter_model(base, lora, groups=groups), settings


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------

def run_training(config: RunConfig, *, resume: bool | str | Path | None = None, show_progress: bool = True,
                 return_adapter_shards: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S,
                 tp_sum: str = "auto", stop_at: int | None = None, overwrite: bool = False) -> TrainResult:
    """Train as `config` says, on every rank of the (torchrun-launched) world; see the module doc.

    resume: None resumes from checkpoint.directory's `latest` when there is one, True requires it,
    False never resumes, a path names the checkpoint.  tp_sum: DeepSpeed's TP-sum mechanism
    ("auto", "coalesce", "hooks"; see train/engine.py).  stop_at: end (with a checkpoint) after
    this global step although the LR schedule runs to optim.steps (a time-limited job).  overwrite:
    a fresh run may delete checkpoint.directory's old checkpoints, the export may replace a
    previous export in export.peft_dir (train/run_directory.py says what is refused)."""
    alike_on_every_rank(lambda: validate_run_config(config))
    created = init_distributed(timeout_s)
    try:
        layout = alike_on_every_rank(lambda: check_parallel_layout(dist.get_world_size(), config))
        options = _Options(resume, show_progress, return_adapter_shards, tp_sum, stop_at, overwrite)
        return _run(config, layout, options)
    finally:
        from parallel_adapters.mcore.compat import destroy_model_parallel

        destroy_model_parallel()
        if created:
            dist.destroy_process_group()


@dataclass(frozen=True)
class _Options:
    resume: bool | str | Path | None
    show_progress: bool
    return_shards: bool
    tp_sum: str
    stop_at: int | None
    overwrite: bool = False


def _run(config: RunConfig, layout: Layout, opts: _Options) -> TrainResult:
    from parallel_adapters.mcore import compat, cpu, schedule

    if not torch.cuda.is_available():
        cpu.enable_cpu_mode()
    groups = compat.initialize_model_parallel(layout.tensor, layout.pipeline, layout.expert, layout.expert_tensor)
    schedule.seed_model_parallel_rngs(config.seed)
    rank0 = dist.get_rank() == 0
    resume_from = resolve_resume(config, opts.resume)
    held: list = []
    on_rank0(lambda: _hold_directory(config, resume_from is None, opts.overwrite, held), "checking the run's outputs")
    try:
        return _build_and_train(config, layout, opts, groups, rank0, resume_from)
    finally:
        for lock in held:
            lock.release()


def _hold_directory(config: RunConfig, fresh: bool, overwrite: bool, held: list) -> None:
    """World rank 0: check the outputs, lock checkpoint.directory (kept in `held`), say what was
    cleaned up."""
    lock = hold_checkpoint_directory(config, fresh, overwrite)
    if lock is None:
        return
    held.append(lock)
    if lock.removed:
        print(f"removed what interrupted saves left in {lock.directory}: {', '.join(lock.removed)}", flush=True)


def _build_and_train(config: RunConfig, layout: Layout, opts: _Options, groups: Any, rank0: bool,
                     resume_from: Path | None) -> TrainResult:
    samples, vocab = build_samples(config)
    model, settings = build_model(config, groups, adapter_config(config, resume_from), rank0)
    if vocab > settings.vocab_size:
        raise ValueError(f"the tokenizer has {vocab} ids but the model's vocabulary is {settings.vocab_size}")
    eva_steps = None
    init = getattr(model.peft_config[model.active_adapter], "init_lora_weights", None)  # LoRA's only
    if resume_from is None and init == "eva":
        eva_steps = run_eva(model, samples, config, rank0 and opts.show_progress)
    if resume_from is None and init == "corda":  # resume rebuilds the residual from the checkpoint's A0, B0
        run_corda(model, samples, config, rank0 and opts.show_progress)
    engine, extra = engine_and_state(config, model, layout, resume_from, opts.tp_sum)
    result = _train(config, layout, model, engine, samples, settings, extra, resume_from, opts)
    result.eva_steps = eva_steps
    return result


def loop_settings(config: RunConfig, layout: Layout, vocab_size: int, engine_name: str,
                  show_progress: bool = True, stop_at: int | None = None) -> Any:
    """The LoopSettings of a run (pure: nothing is built)."""
    from parallel_adapters.train.loop import LoopSettings

    o, c, log = config.optim, config.checkpoint, config.logging
    return LoopSettings(
        steps=o.steps, schedule=LRSchedule(o.lr, o.steps, o.schedule, o.warmup_steps), vocab_size=vocab_size,
        log_every=log.every, metrics_path=Path(log.metrics_jsonl) if log.metrics_jsonl else None,
        checkpoint_dir=Path(c.directory) if c.directory else None, save_every=c.save_every,
        keep_last=c.keep_last, show_progress=show_progress, extra_state={
            "engine": engine_name, "optim.global_batch": layout.global_batch, "data.seq_len": config.data.seq_len,
            "parallel.expert": layout.expert, "parallel.expert_tensor": layout.expert_tensor or layout.tensor},
        stop_step=stop_at, nonfinite=o.nonfinite, hf_checkpoint=config.model.hf_checkpoint)


def batch_sampler(config: RunConfig, layout: Layout, samples: torch.Tensor, dp_rank: int,
                  position: DataPosition | None = None) -> Any:
    """This DP rank's GlobalBatchSampler (the training order: seed, batch sizes, position)."""
    from parallel_adapters.train.loop import GlobalBatchSampler

    return GlobalBatchSampler(samples, layout.micro_batch, dp_rank, layout.data, layout.accumulation,
                              config.seed, position)


def _train(config: RunConfig, layout: Layout, model: Any, engine: Any, samples: torch.Tensor, settings: Any,
           extra: dict, resume_from: Path | None, opts: _Options) -> TrainResult:
    from parallel_adapters.train.finish import export_adapter, verify_with_peft
    from parallel_adapters.train.loop import train_loop

    g = model.groups
    position = DataPosition(**extra["data_position"]) if "data_position" in extra else None
    sampler = batch_sampler(config, layout, samples, g.dp_rank, position)
    loop = loop_settings(config, layout, settings.vocab_size, engine.name, opts.show_progress, opts.stop_at)
    start = int(extra.get("step", 0))
    out = train_loop(model, engine, sampler, loop, start_step=start)
    seconds = sum(s.seconds for s in out.stats)
    result = TrainResult(
        losses=[s.loss for s in out.stats], grad_norms=[s.grad_norm for s in out.stats],
        lrs=[s.lr for s in out.stats], start_step=start, final_step=start + len(out.stats),
        tokens_per_s=sum(s.tokens for s in out.stats) / seconds if seconds else 0.0,
        resumed_from=str(resume_from) if resume_from else None,
        last_checkpoint=str(out.last_checkpoint) if out.last_checkpoint else None,
        metrics_path=str(loop.metrics_path) if loop.metrics_path else None,
        ranks={"rank": dist.get_rank(), "tp": g.tp_rank, "pp": g.pp_rank, "dp": g.dp_rank})
    if opts.return_shards:
        with engine.gathered_params():
            result.adapter_shards = {n: replace(t, local=t.local.detach().clone())
                                     for n, t in model.adapter_state_dict().items()}
    peft_dir, hf_dir = config.export.peft_dir, config.model.hf_checkpoint
    if peft_dir is not None:
        result.export_dir = export_adapter(model, out.last_checkpoint or resume_from, peft_dir, hf_dir, opts.overwrite)
        if config.export.verify_with_peft:
            result.peft_max_logit_diff, result.peft_logit_limit = verify_with_peft(
                model, engine, samples[:2, 0], peft_dir, hf_dir, settings.vocab_size)
    return result


def train_from_args(args: argparse.Namespace) -> TrainResult:
    """The `train` command (see train/cli_args.py): run, then one summary line on rank 0."""
    config = alike_on_every_rank(lambda: load_run_config(args.config, args.overrides))
    result = run_training(config, resume=args.resume, stop_at=args.stop_at,
                          overwrite=args.overwrite)
    if result.ranks.get("rank") == 0 and result.losses:
        print((f"EVA: {result.eva_steps} steps; " if result.eva_steps is not None else "") + f"loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f} over steps {result.start_step + 1}.."
              f"{result.final_step} ({result.tokens_per_s:,.0f} tokens/s); checkpoint: {result.last_checkpoint}; "
              f"PEFT adapter: {result.export_dir}"
              + (f" (PEFT reproduces the logits to {result.peft_max_logit_diff:.1e})"
                 if result.peft_max_logit_diff is not None else ""))
    return result


def main(argv: list[str] | None = None) -> TrainResult:
    """`-m parallel_adapters.train.runner --config CONFIG [overrides and flags in any order]`
    (`-m parallel_adapters train CONFIG ...` is the documented form)."""
    parser = argparse.ArgumentParser(description="LoRA fine-tuning of a Megatron model (run under torchrun).")
    add_train_arguments(parser, config_flag=True)
    args = parser.parse_intermixed_args(argv)
    return run_command("train", lambda: train_from_args(args))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
