"""EVA and CorDA in a training run: their batches (the training samples under another seed) and
the calls of `eva.initialize.initialize_eva_weights` / `eva.corda.initialize_corda_weights` (out of
train/runner.py, which keeps the run's order)."""
from __future__ import annotations

import itertools
from typing import Any

import torch

from parallel_adapters.train.run_config import RunConfig


class _EvaBatches:
    """EVA's data: the training samples under another seed (the training order stays untouched).
    One epoch, then the same batches again without end, as PEFT's itertools.cycle does (EVA stops
    by itself); endless here so that `drawn` counts every batch EVA takes."""

    def __init__(self, samples: torch.Tensor, micro_batch: int, groups: Any, seed: int):
        self.args = (samples, micro_batch, groups.dp_rank, groups.dp_size, seed)
        self.drawn = 0

    def __iter__(self):
        from parallel_adapters.train.data import DataParallelBatches
        from parallel_adapters.train.loop import compute_device

        batches, device = DataParallelBatches(*self.args), compute_device()
        seen = []  # grows only as far as EVA reads
        for step in itertools.count():
            if step < batches.steps_per_epoch:
                seen.append(batches.next_batch())
            self.drawn += 1
            yield {k: v.to(device) for k, v in seen[step % batches.steps_per_epoch].items()}


def run_eva(model: Any, samples: torch.Tensor, config: RunConfig, show_progress: bool) -> int:
    """EVA initialisation of the A factors (collective): `eva.initialize.initialize_eva_weights`
    with its default Megatron forward (PP through mcore.schedule.forward_only).  Returns the number
    of EVA steps (one batch each)."""
    try:
        from parallel_adapters.eva.initialize import initialize_eva_weights
    except ImportError as exc:
        raise ValueError(f"eva: EVA initialisation is not available in this build ({exc})") from None
    batches = _EvaBatches(samples, config.optim.micro_batch, model.groups, config.seed + 1)
    initialize_eva_weights(model, batches, show_progress_bar=show_progress)  # shown on world rank 0 only
    return batches.drawn


def run_corda(model: Any, samples: torch.Tensor, config: RunConfig, show_progress: bool) -> None:
    """CorDA initialisation (collective): the covariance over `corda_config.calibration_batches`
    micro-batches per DP rank of EVA's batches, then `eva.corda.initialize_corda_weights` with its
    default Megatron forward.  Cache / covariance files are read instead when they exist."""
    from parallel_adapters.eva.corda import initialize_corda_weights

    count = model.peft_config[model.active_adapter].corda_config.calibration_batches
    batches = _EvaBatches(samples, config.optim.micro_batch, model.groups, config.seed + 1)
    initialize_corda_weights(model, itertools.islice(batches, count), model.active_adapter,
                             show_progress_bar=show_progress)
