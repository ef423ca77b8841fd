"""One optimizer step's forward and backward over its micro-batches (no Megatron imports here).

The loss is the token mean of the cross entropy over the GLOBAL batch (all micro-batches of all
data-parallel ranks), so that every layout computes the same number as TP=1, DP=1 on the same
samples.  Each micro-batch backpropagates `ce_sum * loss_scale` with

    loss_scale = dp_size / global_valid_tokens,

because the engines AVERAGE gradients over data parallelism (the torch engine's finalize_grads and
DeepSpeed both divide by dp_size): averaging dp copies of sum_r(ce_r) * dp / N gives sum(ce) / N.

PP = 1 runs the micro-batches here, one forward/backward each.  PP > 1 hands them to Megatron's
pipeline schedule (`parallel_adapters.mcore.schedule`); the loss exists on the last stage only.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from parallel_adapters.train.data import LABEL_MASK_VALUE


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Summed next-token cross entropy in fp32 over the unpadded vocabulary; masked labels skip."""
    logits = logits[..., :vocab_size].float()
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=LABEL_MASK_VALUE,
                           reduction="sum")


def valid_tokens(microbatches: Sequence[dict]) -> int:
    """Label positions that count in the loss (this rank's share of the global batch)."""
    return int(sum((mb["labels"] != LABEL_MASK_VALUE).sum().item() for mb in microbatches))


def forward_backward(engine: Any, microbatches: Sequence[dict], loss_scale: float, vocab_size: int,
                     pp_size: int) -> torch.Tensor:
    """Forward and backward of this step's micro-batches; returns this rank's summed (detached)
    cross entropy, or 0 on pipeline stages without the loss.  Call inside `engine.accumulate()`."""
    device = microbatches[0]["input_ids"].device
    if pp_size == 1:
        total = torch.zeros((), dtype=torch.float64, device=device)
        for batch in microbatches:
            logits = engine.forward_module(batch["input_ids"], None, None, runtime_gather_output=True)
            ce_sum = lm_loss_sum(logits, batch["labels"], vocab_size)
            engine.backward(ce_sum * loss_scale)
            total += ce_sum.detach().double()
        return total
    from parallel_adapters.mcore.schedule import pipeline_forward_backward

    num = len(microbatches)

    def loss_fn(batch: dict, logits: torch.Tensor) -> tuple[torch.Tensor, dict]:
        ce_sum = lm_loss_sum(logits, batch["labels"], vocab_size)
        # Megatron divides the returned loss by the number of micro-batches, in place.
        return ce_sum * (loss_scale * num), {"ce_sum": ce_sum.detach().clone()}

    reports = pipeline_forward_backward(engine.forward_module, microbatches, loss_fn)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for report in reports:
        total += report["ce_sum"].double()
    return total
