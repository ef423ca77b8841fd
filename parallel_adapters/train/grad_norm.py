"""The global gradient norm's per-rank share: every element of the full, unsharded gradient
counted exactly once over TP, PP, DP and EP (the counting rule in train/engine.py's docstring)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # importing the adapters imports megatron: not needed to validate a config
    from parallel_adapters.adapters.model import AdapterModel


def grad_sumsq_contribution(model: AdapterModel) -> torch.Tensor:
    """This rank's share of the global squared grad norm (see the module docstring): the world
    sum of these shares is the squared norm of the full, unsharded gradient.  float64, on the
    gradients' device (0-dim)."""
    from parallel_adapters.mcore.moe import is_expert_parameter  # imports megatron (as the model did)

    g = model.groups
    squares = []
    for name, param in model.named_parameters():
        grad = param.grad
        if grad is None or not param.requires_grad:
            continue
        # a routed expert's tensor is replicated over expert-DP and split (or repeated) over expert-TP
        dp_rank, tp_rank = (g.expert_dp_rank, g.etp_rank) if is_expert_parameter(name) else (g.dp_rank, g.tp_rank)
        # copies counted elsewhere: an adapter shared by the experts (on EP rank 0), a prefix MLP (on stage 0)
        replica = ((getattr(param, "expert_shared", False) and g.ep_rank > 0)
                   or (getattr(param, "pipeline_replica", False) and g.pp_rank > 0))
        if dp_rank == 0 and not replica and (getattr(param, "tensor_model_parallel", False) or tp_rank == 0):
            squares.append(grad.detach().double().pow(2).sum())
    return torch.stack(squares).sum() if squares else torch.zeros((), dtype=torch.float64)
