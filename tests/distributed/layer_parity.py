"""One sharded forward + backward of an adapted Megatron linear against its dense reference, shared
by the per-kind layer-parity tests (DoRA, IA3/LoHa, LoKr).

A column layer takes the whole input (its sequence slice under SP) and gives its output columns; a
row layer takes its input-feature slice and gives the whole output (its sequence slice under SP)."""
from __future__ import annotations

from typing import Callable

import torch

from tests.harness import counting


def local_input(x: torch.Tensor, mode: str, rank: int, tp: int, sp: bool) -> torch.Tensor:
    """This rank's share of the full input [s, b, in]."""
    from parallel_adapters.distributed.sharding import ShardSpec

    if mode == "column":
        return ShardSpec(dim=0).shard(x, rank, tp) if sp else x
    return ShardSpec(dim=2).shard(x, rank, tp)


def local_output(mode: str, rank: int, tp: int, sp: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """Full output [s, b, out] -> this rank's share of it."""
    from parallel_adapters.distributed.sharding import ShardSpec

    if mode == "column":
        return lambda t: ShardSpec(dim=2).shard(t, rank, tp)
    return (lambda t: ShardSpec(dim=0).shard(t, rank, tp)) if sp else (lambda t: t)


def sharded_step(model, x: torch.Tensor, dy: torch.Tensor, y_ref: torch.Tensor, dx_ref: torch.Tensor,
                 mode: str, rank: int, tp: int, sp: bool) -> tuple[dict, dict, dict]:
    """Run this rank's forward + backward and finalize_grads on its shares of x and dy; returns the
    output and input-gradient errors against the dense reference's shares, and the collectives of
    forward + backward and of finalize_grads."""
    out = local_output(mode, rank, tp, sp)
    x_in = local_input(x, mode, rank, tp, sp).clone().requires_grad_()
    with counting.counted() as fwd_bwd:
        y, _ = model(x_in)
        y.backward(out(dy))
    with counting.counted() as finalize:
        model.finalize_grads()
    errors = {"y": (y.detach() - out(y_ref.detach())).abs().max().item(),
              "dx": (x_in.grad - local_input(dx_ref, mode, rank, tp, sp)).abs().max().item()}
    return errors, dict(fwd_bwd.calls), dict(finalize.calls)


def kind_parity(model, layer, x, dy, full: dict, reference: Callable, mode: str, rank: int, tp: int,
                sp: bool) -> tuple[dict, dict, dict]:
    """`sharded_step` for an adapter set from full tensors `full`, plus each declared tensor's
    gradient error against its shard of the dense gradient; `reference(x, leaves)` is the dense
    output with the adapter tensors as leaves."""
    model.eval()
    leaves = {n: t.clone().requires_grad_() for n, t in full.items()}
    xr = x.clone().requires_grad_()
    y_ref = reference(xr, leaves)
    y_ref.backward(dy)
    errors, calls, finalize = sharded_step(model, x, dy, y_ref, xr.grad, mode, rank, tp, sp)
    tensors = layer.adapter_tensors("default")
    for decl in layer.tensor_decls("default"):
        errors["d" + decl.name] = (tensors[decl.name].grad - decl.spec.shard(leaves[decl.name].grad, rank, tp)
                                   ).abs().max().item()
    return errors, calls, finalize
