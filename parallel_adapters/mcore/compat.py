"""The only place that imports megatron.core (and, guarded, transformer_engine).

Everything the rest of the package needs to know about a Megatron layer is returned as plain data
(`LinearGeometry`), so adapters, EVA and checkpoints never touch Megatron's globals.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    set_tensor_model_parallel_attributes,
)

from parallel_adapters.distributed.geometry import (  # noqa: F401  (re-exported: hosts and EVA use them)
    EMBEDDING_MODES, LINEAR_MODES, ConvShape, LinearGeometry,
)
from parallel_adapters.distributed.groups import ParallelGroups
from parallel_adapters.distributed.sharding import ShardSpec
from parallel_adapters.ops.dropout import dropout_mask_

try:  # Transformer Engine is optional; a half-installed TE raises more than ImportError.
    import transformer_engine  # noqa: F401  (megatron's extension module imports even without TE)
    from megatron.core.extensions.transformer_engine import (
        TEColumnParallelLinear,
        TELayerNormColumnParallelLinear,
        TERowParallelLinear,
    )

    HAVE_TE = True
except Exception:  # noqa: BLE001
    TEColumnParallelLinear = TERowParallelLinear = TELayerNormColumnParallelLinear = ()
    HAVE_TE = False


def is_parallel_state_initialized() -> bool:
    return parallel_state.model_parallel_is_initialized()


def initialize_model_parallel(tensor_parallel: int = 1, pipeline_parallel: int = 1, expert_parallel: int = 1,
                              expert_tensor_parallel: int | None = None) -> ParallelGroups:
    """(Re)create Megatron's TP/PP/DP groups, and the expert EP/ETP/expert-DP groups of MoE
    layers, on an initialised torch.distributed world.  `expert_tensor_parallel=None` means the
    TP size (Megatron's default)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        expert_model_parallel_size=expert_parallel,
        expert_tensor_parallel_size=expert_tensor_parallel,
    )
    return megatron_parallel_groups()


def destroy_model_parallel() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()


def megatron_parallel_groups() -> ParallelGroups:
    """This rank's ParallelGroups, read from Megatron's initialised parallel state (ValueError if it
    was never initialised)."""
    if not parallel_state.model_parallel_is_initialized():
        raise ValueError(
            "Megatron parallel state is not initialised: call "
            "megatron.core.parallel_state.initialize_model_parallel(...) (or "
            "parallel_adapters.mcore.compat.initialize_model_parallel) before building adapters"
        )
    ps = parallel_state
    return ParallelGroups(
        tp_group=ps.get_tensor_model_parallel_group(),
        pp_group=ps.get_pipeline_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        ep_group=ps.get_expert_model_parallel_group(),
        etp_group=ps.get_expert_tensor_parallel_group(),
        expert_dp_group=ps.get_expert_data_parallel_group(),
        ep_size=ps.get_expert_model_parallel_world_size(),
        ep_rank=ps.get_expert_model_parallel_rank(),
        etp_size=ps.get_expert_tensor_parallel_world_size(),
        etp_rank=ps.get_expert_tensor_parallel_rank(),
        expert_dp_size=ps.get_expert_data_parallel_world_size(),
        expert_dp_rank=ps.get_expert_data_parallel_rank(),
    )


def parallel_mode_of(module: torch.nn.Module) -> str | None:
    """The parallel mode (LinearGeometry.parallel_mode) of a layer we can adapt, else None."""
    if isinstance(module, TELayerNormColumnParallelLinear):
        return "column_fused_norm"
    if isinstance(module, (ColumnParallelLinear, TEColumnParallelLinear)):
        return "column"
    if isinstance(module, (RowParallelLinear, TERowParallelLinear)):
        return "row"
    if isinstance(module, torch.nn.Linear):
        return "replicated"
    if isinstance(module, VocabParallelEmbedding):
        return "vocab"
    if isinstance(module, torch.nn.Embedding):
        return "embedding"
    if isinstance(module, torch.nn.Conv2d):
        return "conv2d"
    return None


def is_vocab_parallel_embedding(module: torch.nn.Module) -> bool:
    return isinstance(module, VocabParallelEmbedding)


def linear_geometry(module: torch.nn.Module, groups: ParallelGroups) -> LinearGeometry:
    mode = parallel_mode_of(module)
    if mode == "replicated":
        return LinearGeometry("replicated", module.in_features, module.out_features, 1, None, 1, 0,
                              False, False, True, False)
    if mode in ("vocab", "embedding", "conv2d"):
        return _lookup_or_conv_geometry(module, mode, groups)
    if mode == "column_fused_norm":
        raise ValueError(
            f"{type(module).__name__} fuses a norm into the linear layer; adapters need the normed "
            "input. Build the model with the local (or unfused TE) layer spec."
        )
    if mode not in ("column", "row"):
        raise ValueError(f"{type(module).__name__} is not a linear layer that adapters can wrap")
    weight = module.weight
    te = HAVE_TE and isinstance(module, (TEColumnParallelLinear, TERowParallelLinear))
    expert = bool(getattr(module, "is_expert", False))
    group, size, rank = _split_group(module, groups, expert)
    return LinearGeometry(
        parallel_mode=mode,
        in_features=module.in_features if te else module.input_size,
        out_features=module.out_features if te else module.output_size,
        chunks=int(getattr(weight, "partition_stride", 1)),
        tp_group=group,
        tp_size=size,
        tp_rank=rank,
        # an expert layer never gathers along the sequence: the dispatcher hands it whole tokens
        sequence_parallel=bool(getattr(module, "sequence_parallel", False)) and size > 1 and not expert,
        gather_output=bool(getattr(module, "gather_output", False)),
        input_is_parallel=bool(getattr(module, "input_is_parallel", True)),
        skip_bias_add=bool(getattr(module, "te_return_bias", False) if te else module.skip_bias_add),
        expert=expert,
        attention=_attention_shape(getattr(module, "config", None)),
    )


def _attention_shape(config: Any) -> tuple[int, int, int] | None:
    """(heads, query groups, head size) from a TransformerConfig (None without one)."""
    heads = getattr(config, "num_attention_heads", None)
    if not isinstance(heads, int):
        return None
    groups = getattr(config, "num_query_groups", None) or heads
    head_size = getattr(config, "kv_channels", None) or config.hidden_size // heads
    return heads, groups, head_size


def _split_group(module: torch.nn.Module, groups: ParallelGroups, expert: bool) -> tuple[Any, int, int]:
    """(group, size, rank) splitting this layer's weight: Megatron builds a routed expert's
    linear layers on the expert-tensor-parallel group (`SequentialMLP` passes `expt_tp`), every
    other layer on the tensor-parallel group.  ValueError if `groups` disagree with the layer."""
    group, size, rank = ((groups.etp_group, groups.etp_size, groups.etp_rank) if expert
                         else (groups.tp_group, groups.tp_size, groups.tp_rank))
    own = getattr(module, "tp_group", None)
    if own is not None and hasattr(own, "size") and own.size() != size:
        which = "expert_tensor_parallel" if expert else "tensor_parallel"
        raise ValueError(f"{type(module).__name__} is split over {own.size()} ranks, but the given "
                         f"ParallelGroups say {which}={size}: build adapters with the model's own groups")
    return group, size, rank


def _lookup_or_conv_geometry(module: torch.nn.Module, mode: str, groups: ParallelGroups) -> LinearGeometry:
    name = type(module).__name__
    if mode == "vocab":
        return LinearGeometry("vocab", module.num_embeddings, module.embedding_dim, 1, groups.tp_group,
                              groups.tp_size, groups.tp_rank,
                              bool(module.reduce_scatter_embeddings) and groups.tp_size > 1, False, True, False)
    if mode == "embedding":
        if module.max_norm is not None or module.sparse:
            raise ValueError(f"{name} with max_norm or sparse=True cannot take an adapter (the lookup would "
                             "renormalise or sparsify the adapter's table too)")
        return LinearGeometry("embedding", module.num_embeddings, module.embedding_dim, 1, None, 1, 0,
                              False, False, True, False, padding_idx=module.padding_idx)
    if module.padding_mode != "zeros" or any(d != 1 for d in module.dilation):
        raise ValueError(f"{name} with padding_mode={module.padding_mode!r}, dilation={module.dilation}: "
                         "adapters support zero padding and dilation 1 (as PEFT's LoRA computes them)")
    conv = ConvShape(tuple(module.kernel_size), tuple(module.stride), module.padding, tuple(module.dilation),
                     module.groups)
    return LinearGeometry("conv2d", module.in_channels, module.out_channels, 1, None, 1, 0,
                          False, False, True, False, conv=conv)


class TrackerDropout:
    """Inverted dropout whose masks come from a named state of Megatron's RNG tracker.

    Activation recompute saves the tracker's states before a checkpointed forward and restores
    them for its replay, so the replay draws the very masks the first pass drew (a private
    generator or a call counter would advance again and give other masks, so wrong gradients).
    The state is added on first use; `tracker_states` / `set_tracker_states` carry it over a
    resume."""

    def __init__(self, p: float, name: str, seed: int):
        self.p, self.name, self.seed = p, name, seed

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with self._fork():
            return dropout_mask_(x, self.p, None)

    def uniform(self, n: int, device: torch.device) -> torch.Tensor:
        """n float32 draws of U[0, 1) (as torch.rand) from this stream (LyCORIS' weight dropout)."""
        with self._fork():
            return torch.rand(n, device=device)

    def _fork(self):
        tracker = tensor_parallel.get_cuda_rng_tracker()
        if self.name not in tracker.get_states():
            if getattr(tracker, "use_cudagraphable_rng", False):
                tracker.add(self.name, self.seed)  # graph-safe states are generators, not tensors
            else:  # the state add() would make, without its once-per-process seed registry
                device = "cuda" if torch.cuda.is_available() else "cpu"
                set_tracker_states({self.name: torch.Generator(device=device).manual_seed(self.seed).get_state()})
        return tracker.fork(self.name)


def tracker_states(names: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Copies of the RNG tracker's states: of `names` (those already added), or all of them.
    Graph-safe trackers (use_cudagraphable_rng) hold generators instead: none are returned."""
    states = tensor_parallel.get_cuda_rng_tracker().get_states()
    names = sorted(states) if names is None else sorted(n for n in names if n in states)
    return {n: states[n].clone() for n in names if isinstance(states[n], torch.Tensor)}


def set_tracker_states(saved: dict[str, torch.Tensor]) -> None:
    """Put saved states back into the RNG tracker (adding or replacing those names only)."""
    tracker = tensor_parallel.get_cuda_rng_tracker()
    states = tracker.get_states()
    states.update({n: t.clone() for n, t in saved.items()})
    tracker.set_states(states)


def recomputes_layers(model: torch.nn.Module) -> bool:
    """Whether a Megatron model recomputes activations (any recompute_granularity)."""
    return getattr(getattr(model, "config", None), "recompute_granularity", None) is not None


def base_bias(module: torch.nn.Module) -> torch.Tensor | None:
    """The bias tensor of a Megatron/TE/torch linear layer (TE keeps an empty one when bias=False)."""
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor) and bias.numel() == 0:
        return None
    return bias


def set_tensor_parallel_attributes(param: torch.nn.Parameter, spec: ShardSpec) -> None:
    """Mark a split factor the way Megatron marks its own TP weights (grad-norm clipping and
    Megatron's checkpointing read these).  Replicated factors stay unmarked, so clipping counts
    them once."""
    if spec.dim is not None:
        set_tensor_model_parallel_attributes(param, True, spec.dim, spec.chunks)
