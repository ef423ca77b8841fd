"""Multi-rank jobs for tests/mcore/test_moe_gpt.py (module-level, plain args, run by WorkerPool).

Data parallelism splits the global batch: DP rank d takes rows [d*B/dp, (d+1)*B/dp).  Each
rank's loss is divided by the DP size, so the gradients summed over DP (dense weights) or over
expert-DP (routed experts) are the gradients of the global mean loss, which the world-1 run
computes directly.  This is the reduction megatron's DDP does, written out so that the test sees
every step.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.harness import counting

MOE = dict(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32, num_attention_heads=4,
           num_query_groups=2, num_layers=2)
"""The tiny MoE GPT: 4 experts, top-2, GQA (4 heads, 2 groups), 2 layers."""


def _setup(tp: int, ep: int, etp: int, pp: int, seed: int):
    from parallel_adapters.mcore import compat, cpu

    cpu.enable_cpu_mode()
    groups = compat.initialize_model_parallel(tp, pp, expert_parallel=ep, expert_tensor_parallel=etp)
    cpu.model_parallel_seed(seed)
    return groups


def _dp_slice(x: torch.Tensor, groups) -> torch.Tensor:
    return x.chunk(groups.dp_size)[groups.dp_rank]


def _settings(sequence_parallel: bool, **kw):
    from parallel_adapters.mcore.gpt import GPTSettings

    return GPTSettings(**{**MOE, "sequence_parallel": sequence_parallel, **kw})


def _gather_full(name: str, param: torch.Tensor, tensor: torch.Tensor, groups) -> torch.Tensor:
    """The full tensor of `tensor` (a shard of parameter `name`) over its split group."""
    from parallel_adapters.mcore.gpt import param_shard_spec
    from parallel_adapters.mcore.moe import split_group

    spec = param_shard_spec(param)
    group, size, _ = split_group(name, groups)
    shards = [tensor.detach().clone()]
    if not spec.replicated and size > 1:
        shards = [torch.empty_like(tensor) for _ in range(size)]
        dist.all_gather(shards, tensor.detach().contiguous(), group=group)
    return spec.unshard(shards)


def _reduce(tensor: torch.Tensor, group, size: int) -> None:
    if size > 1:
        dist.all_reduce(tensor, group=group)


def consolidated_grads(model, groups) -> dict[str, torch.Tensor]:
    """Global name -> full gradient of the global loss: sequence-parallel partials summed over TP,
    dense weights summed over DP, routed experts over expert-DP, then unsharded."""
    from parallel_adapters.mcore.gpt import global_parameter_names
    from parallel_adapters.mcore.moe import is_expert_parameter

    names = global_parameter_names(model)
    out = {}
    for local, param in model.named_parameters():
        name, grad = names[local], param.grad.detach().clone()
        if getattr(param, "sequence_parallel", False):
            _reduce(grad, groups.tp_group, groups.tp_size)
        if is_expert_parameter(name):
            _reduce(grad, groups.expert_dp_group, groups.expert_dp_size)
        else:
            _reduce(grad, groups.dp_group, groups.dp_size)
        out[name] = _gather_full(name, param, grad, groups)
    return out


def full_weights(model, groups) -> dict[str, torch.Tensor]:
    from parallel_adapters.mcore.gpt import global_parameter_names

    names = global_parameter_names(model)
    return {names[n]: _gather_full(names[n], p, p, groups) for n, p in model.named_parameters()}


def _record_routing(model) -> tuple[dict, list]:
    """Forward hooks on every router: global layer index -> routing_map [tokens, experts]."""
    maps, handles = {}, []
    for layer in model.decoder.layers:
        hook = partial(_store_routing, maps, layer.layer_number - 1)
        handles.append(layer.mlp.router.register_forward_hook(hook))
    return maps, handles


def _store_routing(maps: dict, layer: int, module, args, output) -> None:
    maps[layer] = output[1].detach().clone()  # TopKRouter returns (probs, routing_map)


def _mean_loss(loss_scale: float, vocab: int, batch: dict, logits: torch.Tensor):
    # in the logits' dtype: megatron's labels= loss would cast float64 logits to float32
    loss = F.cross_entropy(logits[..., :vocab].flatten(0, 1), batch["labels"].flatten())
    return loss * loss_scale, {"loss": loss.detach().clone()}  # megatron divides the first in place


def _train_step(model, groups, input_ids, labels, num_microbatches: int) -> torch.Tensor | None:
    """Forward+backward of this DP rank's rows through the project's pipeline schedule; the
    global mean loss on the last stage (None elsewhere)."""
    from parallel_adapters.mcore.schedule import pipeline_forward_backward

    ids, lab = _dp_slice(input_ids, groups), _dp_slice(labels, groups)
    micro = [{"input_ids": i, "labels": t} for i, t in zip(ids.chunk(num_microbatches), lab.chunk(num_microbatches))]
    loss_fn = partial(_mean_loss, 1.0 / groups.dp_size, model.unpadded_vocab_size)
    reports = pipeline_forward_backward(model, micro, loss_fn)
    if not groups.is_last_stage:
        return None
    loss = torch.stack([r["loss"] for r in reports]).mean()
    _reduce(loss, groups.dp_group, groups.dp_size)
    return loss / groups.dp_size


def moe_job(tp: int, ep: int, etp: int, pp: int, input_ids: torch.Tensor, labels: torch.Tensor,
            sequence_parallel: bool = False, num_microbatches: int = 1, seed: int = 1234, **settings_kw) -> dict:
    """One layout's logits (this DP rank's rows), routing maps, full weights, global loss and
    consolidated gradients.  All sizes 1: world size 1 on every rank (whole batch, no reduction;
    at TP=EP=PP=1 nothing in the model talks to another rank)."""
    from parallel_adapters.mcore.gpt import build_gpt, gpt_logits

    from parallel_adapters.distributed.groups import ParallelGroups

    settings = _settings(sequence_parallel, seed=seed, **settings_kw)
    groups = _setup(tp, ep, etp, pp, seed)
    if (tp, ep, etp, pp) == (1, 1, 1, 1):
        groups = ParallelGroups.single()  # the reference: every rank alone is world size 1
    model = build_gpt(settings)
    model.eval()
    maps, handles = _record_routing(model)
    with torch.no_grad():
        logits = gpt_logits(model, _dp_slice(input_ids, groups))
    for handle in handles:
        handle.remove()
    model.train()
    loss = _train_step(model, groups, input_ids, labels, num_microbatches)
    return {
        "logits": logits, "loss": loss, "routing": maps,
        "weights": full_weights(model, groups), "grads": consolidated_grads(model, groups),
        "coords": {"tp": groups.tp_rank, "dp": groups.dp_rank, "pp": groups.pp_rank, "ep": groups.ep_rank,
                   "etp": groups.etp_rank, "edp": groups.expert_dp_rank},
        "sizes": {"dp": groups.dp_size, "ep": groups.ep_size, "etp": groups.etp_size,
                  "edp": groups.expert_dp_size},
        "local_experts": {n: p.shape for n, p in model.named_parameters() if "local_experts" in n},
        "dtype": next(model.parameters()).dtype,
    }


def collectives_job(ep: int, input_ids: torch.Tensor, labels: torch.Tensor, steps: int = 2) -> list[dict]:
    """Collectives of forward+backward of the frozen MoE base (only the embedding trainable) at
    EP=ep, TP=1, for `steps` identical steps: {op: calls} per step."""
    from parallel_adapters.mcore.gpt import build_gpt

    groups = _setup(1, ep, 1, 1, 1234)
    model = build_gpt(_settings(False))
    for p in model.parameters():
        p.requires_grad_(False)
    model.embedding.word_embeddings.weight.requires_grad_(True)
    ids, lab = _dp_slice(input_ids, groups), _dp_slice(labels, groups)
    counts = []
    for _ in range(steps):
        with counting.counted() as step:
            model(ids, None, None, labels=lab).mean().backward()
        counts.append(dict(step.calls))
    return counts


def layout_errors_job() -> dict:
    """build_gpt's ValueError message for MoE layouts it refuses ('' if it built), and what a
    default MoE build has."""
    cases = {
        "experts_per_rank": ((1, 2, 1), {"num_moe_experts": 3}),
        "tp_without_sp": ((2, 1, 2), {}),
        "alltoall_on_cpu": ((1, 2, 1), {"moe_token_dispatcher_type": "alltoall"}),
    }
    out = {name: _build_error(*layout, **kw) for name, (layout, kw) in cases.items()}
    return {**out, **_defaults()}


def _defaults() -> dict:
    """What a default MoE build on the CPU has: no TE gemm, aux loss off, allgather dispatcher."""
    from megatron.core.transformer.moe import moe_utils

    from parallel_adapters.mcore.gpt import build_gpt

    _setup(1, 2, 1, 1, 1234)
    if hasattr(moe_utils, "te_general_gemm"):  # bound by CPU mode: build_gpt must bind it itself (GPU path)
        del moe_utils.te_general_gemm
    mlp = build_gpt(_settings(False)).decoder.layers[0].mlp
    return {"te_general_gemm": moe_utils.te_general_gemm, "aux_loss": mlp.router.is_aux_loss_enabled(),
            "dispatcher": type(mlp.token_dispatcher).__name__, "experts": type(mlp.experts).__name__}


def _build_error(tp: int, ep: int, etp: int, **kw) -> str:
    from parallel_adapters.mcore.gpt import build_gpt

    _setup(tp, ep, etp, 1, 1234)
    try:
        build_gpt(_settings(False, **kw))
    except ValueError as exc:
        return str(exc)
    return ""


def capacity_job(input_ids: torch.Tensor, factor: float, policy: str) -> dict:
    """Routing maps of a forward at EP=2 with megatron's capacity factor (tokens over an expert's
    capacity dropped by `policy`), and the number of tokens each router saw."""
    from parallel_adapters.mcore.gpt import build_gpt, gpt_logits

    _setup(1, 2, 1, 1, 1234)
    model = build_gpt(_settings(False, moe_expert_capacity_factor=factor, moe_token_drop_policy=policy))
    maps, handles = _record_routing(model)
    with torch.no_grad():
        gpt_logits(model, input_ids)
    for h in handles:
        h.remove()
    config = model.decoder.layers[0].mlp.config
    return {"maps": maps, "tokens": input_ids.numel(),
            "config": (config.moe_expert_capacity_factor, config.moe_token_drop_policy)}
