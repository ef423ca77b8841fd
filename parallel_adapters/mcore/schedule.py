"""Megatron's schedules and RNG setup, for the training runner and EVA.

- `pipeline_forward_backward`: one optimizer step's micro-batches through `get_forward_backward_func`
  (the training-side logic, what the loss is and how it is scaled, lives in
  `parallel_adapters.train.schedule` and reaches Megatron only through here);
- `forward_only` / `is_megatron_module`: EVA's statistics pass (eva/initialize.py);
- `seed_model_parallel_rngs`: Megatron's RNG tracker states for a run (GPU or CPU mode).

On the CPU, `mcore.cpu.enable_cpu_mode()` must have run: the schedules allocate their token
counters with `device="cuda"`.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Iterator, Sequence

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import MegatronModule

LossFn = Callable[[dict, torch.Tensor], tuple[torch.Tensor, dict]]


def pipeline_forward_backward(model: torch.nn.Module, microbatches: Sequence[dict], loss_fn: LossFn,
                              forward_only: bool = False) -> list[dict]:
    """Run Megatron's (non-interleaved) pipeline schedule over `microbatches` on this stage.

    `model` is this rank's GPT stage (with its adapters).  Every stage needs the micro-batches
    (the first consumes input_ids, the last labels).  `loss_fn(batch, logits)` runs on the last
    stage and returns `(loss_to_backprop, report)`; Megatron DIVIDES the first by the number of
    micro-batches, in place, so `loss_fn` must pre-multiply it and put copies in `report`.
    Returns the reports on the last stage, [] on the others.
    """
    if not microbatches:
        raise ValueError("pipeline_forward_backward: no micro-batches")
    input_ids = microbatches[0]["input_ids"]
    reports = get_forward_backward_func()(
        forward_step_func=partial(_forward_step, loss_fn),
        data_iterator=iter(list(microbatches)),
        model=[model],
        num_microbatches=len(microbatches),
        seq_length=input_ids.shape[1] + prepended_tokens(model),
        micro_batch_size=input_ids.shape[0],
        forward_only=forward_only,
    )
    return list(reports) if parallel_state.is_pipeline_last_stage() else []


def _forward_step(loss_fn: LossFn, data_iterator: Iterator[dict], model: torch.nn.Module) -> tuple[Any, Callable]:
    batch = next(data_iterator)
    output = model(batch["input_ids"], None, None, runtime_gather_output=True)
    return output, partial(loss_fn, batch)


def prepended_tokens(model: torch.nn.Module) -> int:
    """Positions the model's first stage prepends to input_ids (prompt tuning's virtual tokens,
    recorded on every stage as `prepended_tokens`), so that the pipeline's activations are
    input_ids.shape[1] + this long."""
    while hasattr(model, "module"):  # megatron DDP / Float16Module wrappers
        model = model.module
    return int(getattr(model, "prepended_tokens", 0))


def is_megatron_module(module: torch.nn.Module) -> bool:
    """True for a Megatron model (GPTModel, ...): callers pick Megatron's calling convention."""
    return isinstance(module, MegatronModule)


def forward_only(model: torch.nn.Module, input_ids: torch.Tensor, pp_size: int,
                 **forward_kwargs: Any) -> torch.Tensor | None:
    """One forward pass without a schedule's gradient bookkeeping (EVA's statistics pass, logits):
    `model(input_ids, None, None, **forward_kwargs)` at PP=1, Megatron's forward-only schedule
    (one micro-batch) otherwise.  Returns the last stage's output, None on the other stages."""
    if pp_size == 1:
        return model(input_ids, None, None, **forward_kwargs)
    outputs = get_forward_backward_func()(
        forward_step_func=partial(_forward_only_step, forward_kwargs),
        data_iterator=iter([input_ids]),
        model=[model],
        num_microbatches=1,
        seq_length=input_ids.shape[1] + prepended_tokens(model),
        micro_batch_size=input_ids.shape[0],
        forward_only=True,
    )
    return outputs[0] if parallel_state.is_pipeline_last_stage() else None


def _forward_only_step(forward_kwargs: dict, data_iterator: Iterator[torch.Tensor],
                       model: torch.nn.Module) -> tuple[Any, None]:
    return model(next(data_iterator), None, None, **forward_kwargs), None


def seed_model_parallel_rngs(seed: int) -> None:
    """Megatron's RNG setup for a training run (default generator, data-/model-/expert-parallel
    tracker states): `tensor_parallel.model_parallel_cuda_manual_seed` on a GPU, its CPU
    counterpart in CPU mode.  Needs the parallel state to be initialised."""
    if torch.cuda.is_available():
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        return
    from parallel_adapters.mcore import cpu

    cpu.model_parallel_seed(seed)
