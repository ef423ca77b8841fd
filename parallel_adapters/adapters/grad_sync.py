"""The one gradient synchronisation per step (`AdapterModel.finalize_grads`): the partial
gradients of replicated adapter tensors summed over the group that splits their layer, and
optionally the plain-DP mean; one coalesced all-reduce per distinct set of ranks."""
from __future__ import annotations

import torch
from torch import nn

from parallel_adapters.adapters import prefix, prompt
from parallel_adapters.adapters.inject import adapted_layers
from parallel_adapters.distributed import collectives
from parallel_adapters.distributed.groups import ParallelGroups
from parallel_adapters.mcore.moe import is_expert_parameter


def finalize_grads(model: nn.Module, groups: ParallelGroups, data_parallel: bool = False) -> None:
    """See `AdapterModel.finalize_grads`."""
    partial = [(layer.geometry.tp_group, _grads(layer.partial_grad_parameters()))
               for _, layer in adapted_layers(model)]
    partial += [(group, _grads(params)) for group, params in prompt.partial_grad_entries(model)]
    partial += [(group, _grads(params)) for group, params in prefix.partial_grad_entries(model)]
    # an adapter shared by a layer's experts (share_expert_adapters) is replicated over EP
    shared = [p for p in model.parameters() if p.requires_grad and getattr(p, "expert_shared", False)]
    partial.append((groups.ep_group, _grads(shared)))
    partial.append((groups.tp_group, _grads(sequence_sliced_parameters(model))))
    for group, grads in _by_ranks(partial):
        collectives.all_reduce_coalesced_(grads, group)
    if not data_parallel:
        return
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    expert = _grads(p for n, p in trainable if is_expert_parameter(n))
    dense = _grads(p for n, p in trainable if not is_expert_parameter(n))
    for group, grads in _by_ranks([(groups.dp_group, dense), (groups.expert_dp_group, expert)]):
        collectives.all_reduce_coalesced_(grads, group)
    if groups.dp_size > 1:
        for grad in dense + expert:
            grad.div_(groups.dp_size)


def sequence_sliced_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Trained base tensors (modules_to_save: a router, a norm) that Megatron marks `sequence_parallel`:
    each TP rank saw only its slice of the sequence, so their gradients are partial over TP (summed
    over TP, as Megatron's finalize_model_grads does)."""
    return [p for p in model.parameters() if p.requires_grad and getattr(p, "sequence_parallel", False)]


def _grads(params) -> list[torch.Tensor]:
    """The gradients to reduce: Megatron's main_grad where a parameter has one."""
    grads = []
    for param in params:
        grad = getattr(param, "main_grad", None)
        grad = param.grad if grad is None else grad
        if grad is not None:
            grads.append(grad)
    return grads


def _by_ranks(entries: list[tuple[object, list[torch.Tensor]]]) -> list[tuple[object, list[torch.Tensor]]]:
    """(group, gradients) pairs merged by the ranks their group holds, dropping groups of one and
    empty lists: one collective per distinct set of ranks."""
    merged: dict[tuple[int, ...], tuple[object, list[torch.Tensor]]] = {}
    for group, grads in entries:
        if grads and collectives.group_size(group) > 1:
            merged.setdefault(collectives.group_ranks(group), (group, []))[1].extend(grads)
    # a tensor shared by several layers (share_expert_adapters) is listed once per layer: send it once
    return [(group, list({id(g): g for g in grads}.values())) for group, grads in merged.values()]
