"""The training loop: global-batch sampling, one optimizer step, logging, periodic checkpoints,
and what follows the last step (PEFT export and its check).

Per step (collectives in brackets; the engine docstring has the gradient ones):

    [count: 1 scalar all-reduce over the world, only with DP > 1]  global valid tokens N
    forward/backward of the micro-batches with loss scale dp / N      (train/schedule.py)
    engine.reduce_grads()                                             [TP sum (+ DP mean)]
    [stats: 1 all-reduce of 2 float64 over the world]  loss sum (last stage, TP rank 0) and
                                                       the grad-norm share (engine.grad_sumsq)
    engine.step(lr_at(step), grad_norm)

Exact resume needs: the adapter weights and optimizer state (torch engine: adapter_io, keyed by
adapter tensor names; DeepSpeed: ZeRO's per-rank state, flattened by the engine into the same
per-rank safetensors + JSON; no pickle is written or read), the step (the LR schedule is a pure
function of it), the sampler position, the RNG states (captured by save_sharded) and the LoRA
dropout call counters (extra_state).
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from parallel_adapters.adapters.model import AdapterModel
from parallel_adapters.checkpoint.adapter_io import checkpoint_config, checkpoint_tensors, save_checkpoint
from parallel_adapters.checkpoint.base_model import BaseModel
from parallel_adapters.checkpoint.locate import CHECKPOINT_NAME
from parallel_adapters.checkpoint.sharded import save_sharded
from parallel_adapters.distributed import collectives as C
from parallel_adapters.distributed.agreement import agreed
from parallel_adapters.train import zero_state
from parallel_adapters.train.data import DataParallelBatches, DataPosition
from parallel_adapters.train.lr import LRSchedule
from parallel_adapters.train.run_directory import CHECKED_KEY, prune_checkpoints
from parallel_adapters.user_errors import RunFailed, every_rank
from parallel_adapters.train.prompt_run import prompted_batches
from parallel_adapters.train.schedule import forward_backward, valid_tokens

class GlobalBatchSampler:
    """This rank's micro-batches of each global batch: `accumulation` micro-batches of
    `micro_batch` samples per step, drawn as if from dp_size x accumulation "virtual" DP ranks.

    So the SET of samples in a global batch depends only on (seed, position, global batch size),
    not on how it is split between DP ranks and accumulation: any layout sees the TP=1, DP=1 batch.
    """

    def __init__(self, samples: torch.Tensor, micro_batch: int, dp_rank: int, dp_size: int,
                 accumulation: int, seed: int, position: DataPosition | None = None):
        virtual = dp_size * accumulation
        self._parts = [DataParallelBatches(samples, micro_batch, dp_rank * accumulation + j, virtual, seed,
                                           DataPosition(**vars(position)) if position else None)
                       for j in range(accumulation)]

    @property
    def position(self) -> DataPosition:
        return DataPosition(**vars(self._parts[0].position))

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        return [part.next_batch() for part in self._parts]


@dataclass
class LoopSettings:
    """What the loop needs beyond the model and engine (derived from RunConfig by the runner)."""

    steps: int
    schedule: LRSchedule
    vocab_size: int
    log_every: int = 1
    metrics_path: Path | None = None
    checkpoint_dir: Path | None = None
    save_every: int = 0
    keep_last: int = 2
    show_progress: bool = True
    extra_state: dict = field(default_factory=dict)
    """Merged into every checkpoint's extra_state (e.g. the engine name)."""
    nonfinite: str = "stop"
    """A step with a NaN/inf loss or gradient norm: "stop" the run, or "skip" its update."""
    stop_step: int | None = None
    """Stop (and checkpoint) after this step although the schedule runs to `steps`: a job with a
    wall-clock limit, resumed later by a fresh launch."""
    hf_checkpoint: str | None = None
    """The HF checkpoint the base was imported from (model.hf_checkpoint), which every checkpoint
    records with its config.json; None: each records a config.json derived from the model."""


@dataclass
class StepStats:
    step: int
    loss: float
    lr: float
    grad_norm: float | None
    tokens: int
    seconds: float
    skipped: bool = False


@dataclass
class LoopResult:
    stats: list[StepStats] = field(default_factory=list)
    last_checkpoint: Path | None = None


def compute_device() -> torch.device:
    """Where batches and the step's scalars live: this rank's GPU (NCCL reduces only GPU tensors)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def train_step(model: AdapterModel, engine: Any, microbatches: list[dict], lr: float,
               vocab_size: int) -> tuple[float, float | None, int]:
    """One optimizer step; returns (global mean loss, global grad norm or None, global tokens).
    Same values on every rank."""
    g = model.groups
    device = compute_device()
    microbatches = prompted_batches(model, [{k: v.to(device) for k, v in mb.items()} for mb in microbatches])
    count = torch.tensor([valid_tokens(microbatches) if g.tp_rank == 0 and g.pp_rank == 0 else 0],
                         dtype=torch.float64, device=device)
    if g.dp_size > 1:
        C.all_reduce_(count, None)
    else:
        count[0] = valid_tokens(microbatches)
    tokens = int(count.item())
    if tokens == 0:
        raise ValueError("a global batch has no label to predict (every label is masked)")
    engine.zero_grad()
    with engine.accumulate():
        ce_sum = forward_backward(engine, microbatches, g.dp_size / tokens, vocab_size, g.pp_size)
        engine.reduce_grads()
    owns_loss = g.tp_rank == 0 and g.is_last_stage
    stats = torch.stack([ce_sum if owns_loss else torch.zeros_like(ce_sum),
                         engine.grad_sumsq().to(device=device, dtype=torch.float64)])
    C.all_reduce_(stats, None)
    loss = stats[0].item() / tokens
    grad_norm = math.sqrt(stats[1].item()) if engine.computes_grad_norm else None
    if not _finite(loss, grad_norm):  # every rank holds the same two numbers: all stop together
        raise NonFiniteStep(loss, grad_norm, applied=False)
    engine.step(lr, grad_norm)
    if not engine.computes_grad_norm:
        grad_norm = engine.global_grad_norm()
        if not _finite(loss, grad_norm):
            raise NonFiniteStep(loss, grad_norm, applied=True)
    return loss, grad_norm, tokens


def _finite(*values: float | None) -> bool:
    return all(v is None or math.isfinite(v) for v in values)


class NonFiniteStep(RunFailed):
    """A step's loss or gradient norm is NaN/inf (`applied`: the engine had already updated)."""

    def __init__(self, loss: float, grad_norm: float | None, applied: bool) -> None:
        self.loss, self.grad_norm, self.applied = loss, grad_norm, applied
        super().__init__(f"loss {loss}, gradient norm {grad_norm}")


def train_loop(model: AdapterModel, engine: Any, sampler: GlobalBatchSampler, settings: LoopSettings,
               start_step: int = 0) -> LoopResult:
    """Steps start_step .. settings.steps-1, with logging and periodic checkpoints."""
    result = LoopResult()
    rank0 = C.group_rank(None) == 0
    bar = tqdm(total=settings.steps, initial=start_step, desc="train", unit="step",
               disable=not (rank0 and settings.show_progress), dynamic_ncols=True)
    metrics = _MetricsWriter(settings.metrics_path if rank0 else None)
    end = settings.steps if settings.stop_step is None else min(settings.steps, settings.stop_step)
    base = recorded_base(model, settings.hf_checkpoint) if settings.checkpoint_dir is not None else None
    try:
        for step in range(start_step, end):
            began = time.perf_counter()
            lr = settings.schedule(step)
            try:
                loss, grad_norm, tokens = train_step(model, engine, sampler.next_step(), lr, settings.vocab_size)
                stats = StepStats(step + 1, loss, lr, grad_norm, tokens, time.perf_counter() - began)
            except NonFiniteStep as bad:
                stats = _skip_or_stop(bad, step + 1, engine, settings, result, bar if rank0 else None)
            result.stats.append(stats)
            bar.update(1)
            bar.set_postfix(loss=f"{stats.loss:.4f}", tok_s=f"{stats.tokens / max(stats.seconds, 1e-9):,.0f}")
            if (step + 1) % settings.log_every == 0 or step + 1 == end:
                metrics.write(stats)
            if _should_save(settings, step + 1, end):
                result.last_checkpoint = save_training_checkpoint(model, engine, sampler, settings, step + 1, base)
    finally:
        bar.close()
    return result


def _skip_or_stop(bad: NonFiniteStep, step: int, engine: Any, settings: LoopSettings, result: LoopResult,
                  bar: Any) -> StepStats:
    """optim.nonfinite: "skip" drops the step's update (said on rank 0 and in the metrics); "stop"
    (or an update already applied) ends the run on every rank before anything is saved or pruned."""
    if settings.nonfinite == "skip" and not bad.applied:
        engine.zero_grad()
        if bar is not None:
            bar.write(f"step {step}: {bad}: update skipped (optim.nonfinite=skip)", file=sys.stderr)
        return StepStats(step, bad.loss, 0.0, bad.grad_norm, 0, 0.0, skipped=True)
    last = result.last_checkpoint or "none written by this run"
    hint = "" if bad.applied else "; or set optim.nonfinite=skip to drop such steps"
    raise every_rank(RunFailed(
        f"step {step}: {bad} is not finite; stopped before saving or pruning anything (last checkpoint: "
        f"{last}). Lower optim.lr, enable optim.grad_clip, or check the data{hint}"))


def _should_save(settings: LoopSettings, step: int, end: int) -> bool:
    if settings.checkpoint_dir is None:
        return False
    return step == end or (settings.save_every > 0 and step % settings.save_every == 0)


class _MetricsWriter:
    """One JSON object per logged step, appended (a resumed run continues the same file)."""

    def __init__(self, path: Path | None):
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, stats: StepStats) -> None:
        if self.path is None:
            return
        record = {"step": stats.step, "loss": stats.loss, "lr": stats.lr, "grad_norm": stats.grad_norm,
                  "tokens": stats.tokens, "step_time_s": stats.seconds,
                  "tokens_per_s": stats.tokens / max(stats.seconds, 1e-9), "time": time.time()}
        if stats.skipped:
            record["skipped"] = True
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------

def recorded_base(model: AdapterModel, hf_checkpoint: str | None) -> BaseModel | None:
    """What the checkpoints record about the base (checkpoint/base_model.py): the imported HF
    checkpoint, or a config.json derived from the Megatron model (None where none maps to HF)."""
    if hf_checkpoint is not None:
        return BaseModel.from_hf_dir(hf_checkpoint)
    from parallel_adapters.mcore.hf_bridge import hf_config_from_model

    try:
        return BaseModel.from_config(hf_config_from_model(model.model))
    except ValueError:  # not a Llama/Qwen2-shaped model: export then needs --hf-config, as before
        return None


def save_training_checkpoint(model: AdapterModel, engine: Any, sampler: GlobalBatchSampler,
                             settings: LoopSettings, step: int, base: BaseModel | None = None) -> Path:
    """Collective: `<dir>/step-NNNNNN` (adapters, optimizer, RNG, extra state, the `base` model's
    record), then prune to keep_last.  Everything is in that one directory, as safetensors + JSON (docs/design.md section 6):
    the torch engine's AdamW state through adapter_io, DeepSpeed's ZeRO state flattened by
    train/zero_state.py into the same per-rank optimizer state."""
    parent = settings.checkpoint_dir
    name = CHECKPOINT_NAME.format(step=step)
    extra = dict(settings.extra_state, step=step, data_position=vars(sampler.position),
                 adapter_dropout_calls=dropout_counters(model), **{CHECKED_KEY: True})
    optimizer = engine.checkpoint_optimizer()
    if optimizer is not None:
        with engine.gathered_params():
            path = save_checkpoint(model, parent / name, optimizer, extra_state=extra, base=base)
    else:
        state = agreed(lambda: zero_state.capture(engine), "saving the DeepSpeed state")  # before ZeRO-3 gathers
        with engine.gathered_params():
            path = save_sharded(parent / name, checkpoint_tensors(model), model.groups,
                                checkpoint_config(model, base=base), optimizer_state=state, extra_state=extra,
                                rng_state=True, rng_extra=model.tracker_rng_states(), base=base)
    if C.group_rank(None) == 0:
        prune_checkpoints(parent, settings.keep_last)
    return path


def dropout_counters(model: AdapterModel) -> dict[str, dict[str, int]]:
    """LoRA dropout masks are drawn from (seed, call count): save the counts for exact resume."""
    return {name: calls for name, layer in model.adapter_layers() if (calls := layer.dropout_calls())}


def restore_dropout_counters(model: AdapterModel, saved: dict[str, dict[str, int]] | None) -> None:
    for name, layer in model.adapter_layers():
        layer.set_dropout_calls((saved or {}).get(name, {}))
