"""Megatron's mixture-of-experts MLP in our GPT (mcore/gpt.py): config fields, layout checks,
global expert names and which group splits an expert's weights.

A MoE layer (megatron's `MoELayer`, local spec, `moe_grouped_gemm=False`; with True its experts
are one `GroupedMLP`, see adapters/hosts/grouped.py) holds:
- `mlp.router.weight` [experts, hidden]: replicated over every group (under sequence
  parallelism its gradient is partial over TP, marked `sequence_parallel` like the norms);
- `mlp.experts.local_experts.{i}.linear_fc1/linear_fc2`: EP rank e holds experts
  e*num_local .. (e+1)*num_local-1 (`MoELayer.local_expert_indices`), each split over the
  expert-tensor-parallel (ETP) group exactly as a dense MLP is split over TP
  (fc1 [gate_i; up_i] by rows, fc2 by columns); gradients reduce over expert-DP, not DP;
- `mlp.shared_experts.*` (optional): a dense MLP split over TP, run on every token.

Global names are the names in the model built at EP=1, PP=1: local expert i of a layer is
renamed to its global index, so a weight's name (and so its seeded init and its checkpoint key)
does not depend on which rank holds it.

Token dispatch is megatron's "allgather" dispatcher: the routed tokens are all-gathered over the
expert tensor-and-model-parallel group (ETP x EP) and the expert outputs reduce-scattered back;
by default no capacity factor, so no token is ever dropped and routing is the same at every layout
(`moe_expert_capacity_factor` drops tokens per router, i.e. per rank's tokens: layout-dependent).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch
from megatron.core import parallel_state

from parallel_adapters.distributed.groups import ParallelGroups
from parallel_adapters.distributed.sharding import ShardSpec

if TYPE_CHECKING:
    from parallel_adapters.mcore.gpt import GPTSettings

DISPATCHERS = ("allgather", "alltoall", "flex")
DROP_POLICIES = ("probs", "position")
ROUTER_DTYPES = (None, "fp32", "fp64")
_LOCAL_EXPERTS = "mlp.experts.local_experts."


def check_moe_settings(settings: "GPTSettings") -> None:
    """ValueError naming the field for an impossible MoE setting (no parallel state needed)."""
    experts = settings.num_moe_experts
    if experts is None:
        return
    if experts < 1:
        raise ValueError(f"GPTSettings.num_moe_experts must be >= 1 or None, got {experts}")
    if not 1 <= settings.moe_router_topk <= experts:
        raise ValueError(
            f"GPTSettings.moe_router_topk={settings.moe_router_topk} must be in 1..num_moe_experts={experts}")
    if settings.moe_token_dispatcher_type not in DISPATCHERS:
        raise ValueError(f"GPTSettings.moe_token_dispatcher_type must be one of {DISPATCHERS}, "
                         f"got {settings.moe_token_dispatcher_type!r}")
    if settings.moe_router_dtype not in ROUTER_DTYPES:
        raise ValueError(f"GPTSettings.moe_router_dtype must be one of {ROUTER_DTYPES}, got {settings.moe_router_dtype!r}")
    if settings.moe_aux_loss_coeff < 0:
        raise ValueError(f"GPTSettings.moe_aux_loss_coeff must be >= 0, got {settings.moe_aux_loss_coeff}")
    factor = settings.moe_expert_capacity_factor
    if factor is not None and not factor > 0:  # megatron reads a negative factor as None: say so instead
        raise ValueError(f"GPTSettings.moe_expert_capacity_factor must be > 0 or None, got {factor}")
    if settings.moe_token_drop_policy not in DROP_POLICIES:
        raise ValueError(f"GPTSettings.moe_token_drop_policy must be one of {DROP_POLICIES}, "
                         f"got {settings.moe_token_drop_policy!r}")


def check_moe_layout(settings: "GPTSettings") -> None:
    """ValueError for a MoE model the initialised parallel state cannot build or train here."""
    if settings.num_moe_experts is None:
        return
    ep = parallel_state.get_expert_model_parallel_world_size()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if settings.num_moe_experts % ep:
        raise ValueError(f"GPTSettings.num_moe_experts={settings.num_moe_experts} must divide by "
                         f"expert_parallel={ep}")
    if tp > 1 and not settings.sequence_parallel:
        # megatron's MoELayer refuses to train at TP > 1 without it (moe_layer.py)
        raise ValueError("GPTSettings.sequence_parallel must be True for a MoE model at tensor_parallel > 1")
    if settings.moe_grouped_gemm:
        from megatron.core.transformer.moe import grouped_gemm_util

        if not grouped_gemm_util.grouped_gemm_is_available():
            raise ValueError("GPTSettings.moe_grouped_gemm=True needs the grouped_gemm package (megatron's "
                             "GroupedMLP runs its gmm kernels); install it or use moe_grouped_gemm=False")
    if not torch.cuda.is_available() and settings.moe_token_dispatcher_type != "allgather":
        raise ValueError(f"GPTSettings.moe_token_dispatcher_type={settings.moe_token_dispatcher_type!r} needs CUDA "
                         "(megatron creates CUDA streams for it); use 'allgather' on the CPU")


def bind_router_gemm() -> None:
    """megatron-core 0.16.1's router gating linear tests `te_general_gemm is not None`, a name its
    moe_utils binds only when Transformer Engine imports: without TE every MoE forward raises
    NameError, on a GPU as on the CPU.  Bind it to None (the torch.mm path it means); with TE, a no-op."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def moe_config_fields(settings: "GPTSettings") -> dict[str, Any]:
    """The TransformerConfig fields of the MoE layers ({} for a dense model), with the EP/ETP
    sizes of the initialised parallel state and every fusion off (TE-only or torch.compile)."""
    if settings.num_moe_experts is None:
        return {}
    return {
        "num_moe_experts": settings.num_moe_experts,
        "moe_router_topk": settings.moe_router_topk,
        "moe_ffn_hidden_size": settings.moe_ffn_hidden_size or settings.ffn_hidden_size,
        "moe_shared_expert_intermediate_size": settings.moe_shared_expert_intermediate_size,
        "moe_token_dispatcher_type": settings.moe_token_dispatcher_type,
        "moe_router_dtype": settings.moe_router_dtype,
        "moe_router_pre_softmax": settings.moe_router_pre_softmax,
        "moe_aux_loss_coeff": settings.moe_aux_loss_coeff,
        # None (the default) drops no token, so routing is layout-independent; with a factor each
        # router drops over ITS tokens (this rank's sequence slice under SP): layout-dependent
        "moe_expert_capacity_factor": settings.moe_expert_capacity_factor,
        "moe_token_drop_policy": settings.moe_token_drop_policy,
        # False: SequentialMLP, one ColumnParallel/RowParallel pair per expert; True: GroupedMLP
        "moe_grouped_gemm": settings.moe_grouped_gemm,
        "moe_permute_fusion": False,
        "moe_router_fusion": False,
        "expert_model_parallel_size": parallel_state.get_expert_model_parallel_world_size(),
        "expert_tensor_parallel_size": parallel_state.get_expert_tensor_parallel_world_size(),
    }


_GROUPED = ("mlp.experts.weight1", "mlp.experts.weight2", "mlp.experts.linear_fc1.", "mlp.experts.linear_fc2.")


def is_expert_parameter(name: str) -> bool:
    """A routed expert's weight (split over ETP, reduced over expert-DP), SequentialMLP's or
    GroupedMLP's (weight1/weight2 and their adapter hosts linear_fc1/2); shared experts are not."""
    return _LOCAL_EXPERTS in name or any(part in name for part in _GROUPED)


def grouped_gmm(x: torch.Tensor, weights: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """GroupedMLP's product: rows x [T, in] sorted by expert times weights [E, in, out], through
    megatron's binding of grouped_gemm's `gmm` (resolved at call time, so a stand-in installed
    into `grouped_gemm_util` is seen)."""
    from megatron.core.transformer.moe import grouped_gemm_util

    return grouped_gemm_util.ops.gmm(x, weights, tokens_per_expert, trans_b=False)


def is_grouped_weight(name: str) -> bool:
    """GroupedMLP's fused `...mlp.experts.weight1` / `weight2`."""
    return name.endswith(("mlp.experts.weight1", "mlp.experts.weight2"))


def grouped_expert_weight(draw: Callable[[str, tuple[int, ...]], torch.Tensor], name: str, shape: torch.Size,
                          local_indices: list[int], ffn: int, hidden: int, rank: int, size: int) -> torch.Tensor:
    """GroupedMLP's weight1 / weight2 (global `name`, local `shape`) holding the weights the
    SequentialMLP experts would: local expert e's full gated fc1 [2 ffn, H] / fc2 [H, ffn], drawn by
    `draw` under its per-expert name, split over ETP as those layers ([gate_i; up_i] rows / columns),
    transposed and stacked as GroupedMLP views them ([E, H, F1] / [E, F2, H])."""
    prefix, which = name.rsplit(".", 1)
    fc1 = which == "weight1"
    spec = ShardSpec(dim=0, chunks=2) if fc1 else ShardSpec(dim=1)
    full_shape = (2 * ffn, hidden) if fc1 else (hidden, ffn)
    linear = "linear_fc1" if fc1 else "linear_fc2"
    blocks = [spec.shard(draw(f"{prefix}.local_experts.{e}.{linear}.weight", full_shape), rank, size).t()
              for e in local_indices]
    return torch.stack(blocks).reshape(shape)


def is_grouped_experts(module: torch.nn.Module) -> bool:
    """Megatron's GroupedMLP (fused experts run by grouped_gemm's gmm)."""
    from megatron.core.transformer.moe.experts import GroupedMLP

    return isinstance(module, GroupedMLP)


def shared_expert_module(global_name: str) -> str | None:
    """`...mlp.experts.local_experts.<g>.<linear>` -> `...mlp.experts.<linear>`: the name of the
    one adapter the routed experts of that layer share (LoraConfig.share_expert_adapters; it
    seeds the adapter's init, so every expert and EP rank draws the same); None for any other module."""
    head, sep, tail = global_name.partition(_LOCAL_EXPERTS)
    if not sep or "." not in tail:
        return None
    return f"{head}mlp.experts.{tail.split('.', 1)[1]}"


def global_expert_suffix(layer: torch.nn.Module, suffix: str) -> str:
    """`suffix` (a parameter name inside a transformer layer) with a local expert index replaced
    by the global one: EP rank e's local expert i is expert e * num_local + i."""
    if not suffix.startswith(_LOCAL_EXPERTS):
        return suffix
    index, rest = suffix[len(_LOCAL_EXPERTS):].split(".", 1)
    return f"{_LOCAL_EXPERTS}{layer.mlp.local_expert_indices[int(index)]}.{rest}"


def global_expert_modules(model: torch.nn.Module) -> dict[str, str]:
    """Local module path of each routed expert (`...mlp.experts.local_experts.<i>`) -> the same
    path with its global expert index (read from the MoE layer's `local_expert_indices`)."""
    out = {}
    for name, module in model.named_modules():
        indices = getattr(module, "local_expert_indices", None)
        experts = getattr(getattr(module, "experts", None), "local_experts", None)
        if indices is None or experts is None:
            continue
        prefix = f"{name}.experts.local_experts." if name else "experts.local_experts."
        out.update({f"{prefix}{i}": f"{prefix}{indices[i]}" for i in range(len(experts))})
    return out


def split_group(name: str, groups: ParallelGroups) -> tuple[Any, int, int]:
    """(group, size, rank) of the group that splits parameter `name` (global name) along its
    partition_dim: expert tensor parallel for routed experts, tensor parallel otherwise."""
    if is_expert_parameter(name):
        return groups.etp_group, groups.etp_size, groups.etp_rank
    return groups.tp_group, groups.tp_size, groups.tp_rank
