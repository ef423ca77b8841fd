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
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from parallel_adapters.adapters.model import AdapterModel
from parallel_adapters.checkpoint.adapter_io import checkpoint_config, save_checkpoint
from parallel_adapters.checkpoint.sharded import save_sharded
from parallel_adapters.distributed import collectives as C
from parallel_adapters.distributed.agreement import agreed, on_rank0
from parallel_adapters.train import zero_state
from parallel_adapters.train.data import DataParallelBatches, DataPosition
from parallel_adapters.train.lr import LRSchedule
from parallel_adapters.train.schedule import forward_backward, valid_tokens

CHECKPOINT_NAME = "step-{step:06d}"
_CHECKPOINT_RE = re.compile(r"^step-(\d{6,})$")


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
    stop_step: int | None = None
    """Stop (and checkpoint) after this step although the schedule runs to `steps`: a job with a
    wall-clock limit, resumed later by a fresh launch."""


@dataclass
class StepStats:
    step: int
    loss: float
    lr: float
    grad_norm: float | None
    tokens: int
    seconds: float


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
    microbatches = [{k: v.to(device) for k, v in mb.items()} for mb in microbatches]
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
    grad_norm = math.sqrt(stats[1].item()) if engine.computes_grad_norm else None
    engine.step(lr, grad_norm)
    if not engine.computes_grad_norm:
        grad_norm = engine.global_grad_norm()
    return stats[0].item() / tokens, grad_norm, tokens


def train_loop(model: AdapterModel, engine: Any, sampler: GlobalBatchSampler, settings: LoopSettings,
               start_step: int = 0) -> LoopResult:
    """Steps start_step .. settings.steps-1, with logging and periodic checkpoints."""
    result = LoopResult()
    rank0 = C.group_rank(None) == 0
    bar = tqdm(total=settings.steps, initial=start_step, desc="train", unit="step",
               disable=not (rank0 and settings.show_progress), dynamic_ncols=True)
    metrics = _MetricsWriter(settings.metrics_path if rank0 else None)
    end = settings.steps if settings.stop_step is None else min(settings.steps, settings.stop_step)
    try:
        for step in range(start_step, end):
            began = time.perf_counter()
            lr = settings.schedule(step)
            loss, grad_norm, tokens = train_step(model, engine, sampler.next_step(), lr, settings.vocab_size)
            stats = StepStats(step + 1, loss, lr, grad_norm, tokens, time.perf_counter() - began)
            result.stats.append(stats)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / max(stats.seconds, 1e-9):,.0f}")
            if (step + 1) % settings.log_every == 0 or step + 1 == end:
                metrics.write(stats)
            if _should_save(settings, step + 1, end):
                result.last_checkpoint = save_training_checkpoint(model, engine, sampler, settings, step + 1)
    finally:
        bar.close()
    return result


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
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------

def save_training_checkpoint(model: AdapterModel, engine: Any, sampler: GlobalBatchSampler,
                             settings: LoopSettings, step: int) -> Path:
    """Collective: `<dir>/step-NNNNNN` (adapters, optimizer, RNG, extra state), then prune to
    keep_last.  Everything is in that one directory, as safetensors + JSON (DESIGN.md section 6):
    the torch engine's AdamW state through adapter_io, DeepSpeed's ZeRO state flattened by
    train/zero_state.py into the same per-rank optimizer state."""
    parent = settings.checkpoint_dir
    name = CHECKPOINT_NAME.format(step=step)
    extra = dict(settings.extra_state, step=step, data_position=vars(sampler.position),
                 lora_dropout_calls=dropout_counters(model))
    optimizer = engine.checkpoint_optimizer()
    if optimizer is not None:
        with engine.gathered_params():
            path = save_checkpoint(model, parent / name, optimizer, extra_state=extra)
    else:
        state = agreed(lambda: zero_state.capture(engine), "saving the DeepSpeed state")  # before ZeRO-3 gathers
        with engine.gathered_params():
            path = save_sharded(parent / name, model.adapter_state_dict(), model.groups, checkpoint_config(model),
                                optimizer_state=state, extra_state=extra, rng_state=True,
                                rng_extra=model.tracker_rng_states())
    if C.group_rank(None) == 0:
        prune_checkpoints(parent, settings.keep_last)
    return path


def list_checkpoints(parent: Path) -> list[tuple[int, Path]]:
    """(step, directory) of the step-NNNNNN checkpoints under `parent`, oldest first."""
    found = []
    for child in Path(parent).iterdir() if Path(parent).is_dir() else []:
        match = _CHECKPOINT_RE.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def prune_checkpoints(parent: Path, keep_last: int, protect: Callable[[Path], bool] | None = None) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints; never the one `latest` names.
    World rank 0 only: it is the only writer of `latest`."""
    latest = (parent / "latest").read_text().strip() if (parent / "latest").is_file() else None
    removed = []
    for _, path in list_checkpoints(parent)[:-keep_last] if keep_last > 0 else []:
        if path.name == latest or (protect is not None and protect(path)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def dropout_counters(model: AdapterModel) -> dict[str, dict[str, int]]:
    """LoRA dropout masks are drawn from (seed, call count): save the counts for exact resume."""
    return {name: calls for name, layer in model.adapter_layers() if (calls := layer.dropout_calls())}


def restore_dropout_counters(model: AdapterModel, saved: dict[str, dict[str, int]] | None) -> None:
    for name, layer in model.adapter_layers():
        layer.set_dropout_calls((saved or {}).get(name, {}))


# ----------------------------------------------------------------------------------------------
# After training: export and check
# ----------------------------------------------------------------------------------------------

def export_adapter(model: AdapterModel, checkpoint: Path | None, peft_dir: str, hf_dir: str | None) -> str:
    """World rank 0 writes the PEFT adapter from the final checkpoint (an offline, single-process
    step); the others wait, so the run ends only when the export exists.  The HF config is the
    checkpoint's, or one derived from the Megatron model.
    INTEGRATION POINT: parallel_adapters.checkpoint.export.export_peft_from_checkpoint."""
    from parallel_adapters.checkpoint.export import export_peft_from_checkpoint
    from parallel_adapters.mcore.hf_bridge import hf_config_from_model

    def export() -> str:
        if checkpoint is None:
            raise ValueError("export.peft_dir: no checkpoint was written by this run")
        hf_config = hf_dir or hf_config_from_model(model.model)
        return str(export_peft_from_checkpoint(checkpoint, peft_dir, hf_config))

    return on_rank0(export, f"export to {peft_dir}")


def verify_with_peft(model: AdapterModel, engine: Any, input_ids: torch.Tensor, peft_dir: str,
                     hf_dir: str | None, vocab_size: int) -> tuple[float, float]:
    """export.verify_with_peft: PEFT (the exported adapter on the Hugging Face base) must reproduce
    the Megatron logits on `input_ids`; returns the max difference and the limit it was held to.  Without a HF checkpoint the
    base is first written as one next to the adapter (`<peft_dir>-hf-base`).  Collective.
    INTEGRATION POINT: parallel_adapters.interop.peft_check.verify_peft_reproduces."""
    from parallel_adapters.interop.peft_check import verify_peft_reproduces
    from parallel_adapters.mcore.gpt import gpt_logits
    from parallel_adapters.mcore.hf_bridge import export_hf_checkpoint

    g = model.groups
    if hf_dir is None:
        if getattr(engine, "stage", 0) == 3:
            raise ValueError("export.verify_with_peft under ZeRO-3 needs model.hf_checkpoint (the base "
                             "weights are partitioned and cannot be exported from the run)")
        hf_dir = export_hf_checkpoint(model.model, Path(peft_dir).with_name(Path(peft_dir).name + "-hf-base"), g)
    device_ids, was_training = input_ids.to(compute_device()), model.training
    model.eval()
    with torch.no_grad():
        if g.pp_size == 1:  # through the engine: ZeRO-3 gathers its partitioned weights in forward
            logits = engine.forward_module(device_ids, None, None, runtime_gather_output=True)[..., :vocab_size]
        else:
            logits = gpt_logits(model.model, device_ids)
    model.train(was_training)
    mine = logits.cpu() if (g.is_last_stage and g.tp_rank == 0 and g.dp_rank == 0) else None
    megatron = next(x for x in C.all_gather_objects(mine, None) if x is not None)
    atol = peft_tolerance(megatron, {p.dtype for p in model.model.parameters() if not p.requires_grad})
    diff = on_rank0(lambda: verify_peft_reproduces(hf_dir, peft_dir, input_ids, megatron, atol), "verify_with_peft")
    return diff, atol


def peft_tolerance(megatron_logits: torch.Tensor, base_dtypes: set) -> float:
    """How far PEFT (float32) may be from the Megatron logits.  On a float32 base 1e-4, or 1e-5 of
    the largest logit where that is more: float32 rounding through many layers grows with the
    logits' scale (a pretrained model's reach 30-40; SmolLM2-135M at TP=3 differs from PEFT by up to
    9e-5 on logits up to 38), while a layout error (a wrong split or permutation) moves them by
    whole units.  On a bfloat16 base (8-bit mantissa, rounding at every layer) 5% of the largest
    logit, which a layout error still exceeds many times over."""
    scale = megatron_logits.float().abs().max().item()
    if base_dtypes <= {torch.float32, torch.float64}:
        return max(1e-4, 1e-5 * scale)
    return 0.05 * max(1.0, scale)
