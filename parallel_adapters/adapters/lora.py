"""LoRA wrappers for Megatron's column- and row-parallel linear layers, and for plain nn.Linear.

Legend: T tokens (any leading dims, Megatron's [S, B]), I in, O out, r rank, t = TP size, s scale.

The wrappers compute the frozen base matmul themselves (F.linear on the base's own weight and
bias) instead of calling the base layer's forward, so that the adapter path rides inside the
base's single collective.  No collective is added per micro-batch; the TP-replicated factor's
gradient is a per-rank partial that `finalize_grads` sums once per optimizer step.

The base layer's parameters are registered on the wrapper under their original names (`weight`,
`bias`), and the base module itself is kept out of the module tree, so base state-dict keys are
unchanged and Megatron code that reads `layer.weight` or other attributes keeps working.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from parallel_adapters.adapters import functional as lf
from parallel_adapters.distributed import collectives as C
from parallel_adapters.distributed.sharding import ShardSpec
from parallel_adapters.mcore.compat import (
    LinearGeometry, TrackerDropout, base_bias, set_tensor_parallel_attributes,
)
from parallel_adapters.ops.dropout import dropout_mask_

DROPOUT_STREAM_PREFIX = "lora-dropout/"  # names of the adapters' RNG-tracker states


class _Factor(nn.Module):
    """Holds one factor as `.weight`, so keys read `lora_A.<adapter>.weight` as in PEFT."""

    def __init__(self, tensor: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(tensor)


class _SeededDropout:
    """Inverted dropout for adapters on a plain nn.Linear: each call's mask from a private
    generator seeded with (seed, call count), so a resume that restores the count continues the
    masks exactly.  (Megatron layers use `compat.TrackerDropout`, which activation recompute replays.)"""

    def __init__(self, p: float, seed: int):
        self.p, self.seed, self.calls = p, seed, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator(device=x.device)
        generator.manual_seed(lf.factor_seed(self.seed, str(self.calls)))
        self.calls += 1
        return dropout_mask_(x, self.p, generator)


class LoRALayerBase(nn.Module):
    """Bookkeeping shared by all LoRA wrappers: named adapters, scaling, merge state."""

    def __init__(self, base: nn.Module, geometry: LinearGeometry, module_name: str,
                 autocast_adapter_dtype: bool = True):
        super().__init__()
        self.weight = base.weight
        self.factor_dtype = lf.factor_dtype(base.weight.dtype, autocast_adapter_dtype)
        self.bias = base_bias(base)
        # Set after weight/bias: the attribute fallback to the base would shadow them otherwise.
        object.__setattr__(self, "_base", base)  # outside the module tree on purpose (see top)
        self.geometry = geometry
        self.module_name = module_name
        self.spec_a, self.spec_b = lf.lora_factor_specs(geometry.parallel_mode, geometry.chunks)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self._dropout: dict[str, _SeededDropout | TrackerDropout | None] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self._unmerged_weight: torch.Tensor | None = None
        self.disabled = False

    # -- adapters ----------------------------------------------------------------------------

    def add_adapter(self, name: str, r: int, alpha: float, scaling: float, dropout: float,
                    full_a: torch.Tensor, full_b: torch.Tensor, seed: int, dp_rank: int = 0,
                    pp_rank: int = 0) -> None:
        """Register adapter `name` from its FULL factors; this rank keeps its shard."""
        if name in self.lora_A:
            raise ValueError(f"{self.module_name}: adapter {name!r} is already applied to this module")
        g = self.geometry
        a = self.spec_a.shard(full_a, g.tp_rank, g.tp_size).clone()
        b = self.spec_b.shard(full_b, g.tp_rank, g.tp_size).clone()
        dtype, device = self.factor_dtype, self.weight.device
        self.lora_A[name] = _Factor(a.to(device=device, dtype=dtype))
        self.lora_B[name] = _Factor(b.to(device=device, dtype=dtype))
        set_tensor_parallel_attributes(self.lora_A[name].weight, self.spec_a)
        set_tensor_parallel_attributes(self.lora_B[name].weight, self.spec_b)
        self.r[name], self.lora_alpha[name], self.scaling[name] = r, alpha, scaling
        self._dropout[name] = self._make_dropout(dropout, seed, name, dp_rank, pp_rank) if dropout > 0 else None
        if not self.active_adapters:
            self.active_adapters = [name]

    def replace_factors(self, name: str, local_a: torch.Tensor, local_b: torch.Tensor,
                        r: int, alpha: float, scaling: float) -> None:
        """Swap in new factor SHARDS (possibly of another rank r), e.g. from EVA or a checkpoint."""
        if name not in self.lora_A:
            raise ValueError(f"{self.module_name}: no adapter {name!r}")
        g = self.geometry
        want_a = self.spec_a.local_shape((r, g.in_features), g.tp_size)
        want_b = self.spec_b.local_shape((g.out_features, r), g.tp_size)
        if tuple(local_a.shape) != want_a or tuple(local_b.shape) != want_b:
            raise ValueError(f"{self.module_name}: factor shards {tuple(local_a.shape)}, {tuple(local_b.shape)} "
                             f"do not match r={r}: expected {want_a}, {want_b}")
        trainable = self.lora_A[name].weight.requires_grad
        for table, tensor, spec in ((self.lora_A, local_a, self.spec_a), (self.lora_B, local_b, self.spec_b)):
            factor = _Factor(tensor.detach().to(device=self.weight.device, dtype=self.factor_dtype).clone())
            factor.weight.requires_grad_(trainable)
            set_tensor_parallel_attributes(factor.weight, spec)
            table[name] = factor
        self.r[name], self.lora_alpha[name], self.scaling[name] = r, alpha, scaling

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"{self.module_name}: unmerge adapter {name!r} before deleting it")
        for table in (self.lora_A, self.lora_B):
            del table[name]
        for table in (self.r, self.lora_alpha, self.scaling, self._dropout):
            table.pop(name)
        self.active_adapters = [n for n in self.active_adapters if n != name]

    @property
    def input_is_tp_replicated(self) -> bool:
        g = self.geometry
        return g.parallel_mode == "column" and not g.sequence_parallel

    def _make_dropout(self, p: float, seed: int, name: str, dp_rank: int, pp_rank: int):
        """Megatron layers: a stream of Megatron's RNG tracker (replayed by activation recompute),
        one per adapter for TP-replicated inputs (the same masks on every TP rank, no
        communication) and one per adapter and TP rank for sharded inputs.  nn.Linear: a private
        generator per module and call."""
        g = self.geometry
        if g.parallel_mode == "replicated":
            return _SeededDropout(p, lf.factor_seed(seed, self.module_name, name, f"dp{dp_rank}", "tp0"))
        shared = self.input_is_tp_replicated
        stream = f"{DROPOUT_STREAM_PREFIX}{name}/{'tp-shared' if shared else 'tp-rank'}"
        rank_key = "tp-shared" if shared else f"tp{g.tp_rank}"
        return TrackerDropout(p, stream, lf.factor_seed(seed, stream, f"dp{dp_rank}", f"pp{pp_rank}", rank_key))

    def _running_adapters(self) -> list[str]:
        if self.disabled:
            return []
        return [n for n in self.active_adapters if n in self.lora_A and n not in self.merged_adapters]

    def dropout_calls(self) -> dict[str, int]:
        """Masks drawn so far per adapter on an nn.Linear (for resume; Megatron layers' streams are
        RNG-tracker states, saved with `AdapterModel.tracker_rng_states`)."""
        return {name: d.calls for name, d in self._dropout.items() if isinstance(d, _SeededDropout)}

    def set_dropout_calls(self, calls: dict[str, int]) -> None:
        for name, count in calls.items():
            if isinstance(self._dropout.get(name), _SeededDropout):
                self._dropout[name].calls = int(count)

    def _dropout_fn(self, name: str):
        dropout = self._dropout[name]
        return dropout if (dropout is not None and self.training) else None

    def partial_grad_parameters(self) -> Iterator[nn.Parameter]:
        """Trainable parameters whose gradient is a per-rank partial sum over TP (see module doc)."""
        if self.geometry.tp_size == 1:
            return
        for name in self.lora_A:
            spec_pairs = ((self.lora_A[name].weight, self.spec_a), (self.lora_B[name].weight, self.spec_b))
            for param, spec in spec_pairs:
                if spec.replicated and param.requires_grad:
                    yield param
        # Under sequence parallelism a row layer's bias is added to sequence shards.
        if (self.geometry.parallel_mode == "row" and self.geometry.sequence_parallel
                and self.bias is not None and self.bias.requires_grad):
            yield self.bias

    # -- merge ---------------------------------------------------------------------------------

    def merge(self, names: list[str] | None = None, safe_merge: bool = False) -> None:
        """W_i += s B_i A (column) or s B A_i (row): each rank merges its own shard, no communication."""
        names = [n for n in (names or self.active_adapters) if n not in self.merged_adapters]
        if not names:
            return
        with torch.no_grad():
            merged = self.weight.detach().clone()
            for name in names:
                merged = lf.merged_weight(merged, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name])
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"{self.module_name}: merging adapter(s) {names} gives non-finite weights")
            if self._unmerged_weight is None:
                self._unmerged_weight = self.weight.detach().clone()
            self.weight.copy_(merged)
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        """Restore the exact pre-merge base weight."""
        if self._unmerged_weight is None:
            return
        with torch.no_grad():
            self.weight.copy_(self._unmerged_weight)
        self._unmerged_weight = None
        self.merged_adapters = []

    # -- Megatron / state-dict compatibility ----------------------------------------------------

    @property
    def base_layer(self) -> nn.Module:
        return self._base

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """Megatron distributed checkpointing: the base's own entries (adapters use our format)."""
        return self._base.sharded_state_dict(prefix, sharded_offsets, metadata)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "_base" not in self.__dict__:
                raise
            return getattr(self.__dict__["_base"], name)

    def extra_repr(self) -> str:
        g = self.geometry
        ranks = ", ".join(f"{n}: r={self.r[n]}" for n in self.lora_A)
        return f"{g.parallel_mode}, in={g.in_features}, out={g.out_features}, tp={g.tp_size}, {ranks}"


class _MegatronStateMixin:
    """Megatron's linear layers carry `_extra_state` in their state dict; keep that key."""

    def get_extra_state(self):
        return self._base.get_extra_state()

    def set_extra_state(self, state) -> None:
        self._base.set_extra_state(state)


class ColumnParallelLoRA(_MegatronStateMixin, LoRALayerBase):
    """LoRA on a column-parallel base.

    Shards (rank i of t):  W_i [O/t, I] (frozen)   A [r, I] replicated   B_i [O/t, r]
    forward, SP off:  x -> copy_to (identity) -> y_i = x W_i^T + s (drop(x) A^T) B_i^T (+ b_i)
    backward, SP off: the copy_to all-reduce of dx carries base + adapter (ONE all-reduce, as the
                      base alone); dB_i complete; dA partial -> summed in finalize_grads.
    forward, SP on:   [x_local | z_local] (z = drop(x) A^T, r extra columns) -> ONE all-gather
                      along the sequence -> y_i = x W_i^T + s z B_i^T
    backward, SP on:  [dx | dz] -> ONE reduce-scatter; dA partial -> summed in finalize_grads.
    gather_output:    the base's all-gather of y (adapter already inside y).
    Returns (output, bias) where bias is not None only with skip_bias_add.
    """

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None,
                runtime_gather_output: bool | None = None):
        g = self.geometry
        weight = self.weight if weight is None else weight
        names = self._running_adapters()
        if g.sequence_parallel:
            x, zs = self._gather_with_adapter_columns(x, names)
        else:
            x = C.copy_to_group(x, g.tp_group)
            zs = [lf.lora_down(x, self.lora_A[n].weight, self._dropout_fn(n)) for n in names]
        y = F.linear(x, weight, None if g.skip_bias_add else self.bias)
        for name, z in zip(names, zs):
            y = lf.add_lora_up(y, z, self.lora_B[name].weight, self.scaling[name])
        gather = g.gather_output if runtime_gather_output is None else runtime_gather_output
        if gather:
            y = C.gather_last_dim(y, g.tp_group)
        return y, (self.bias if g.skip_bias_add else None)

    def _gather_with_adapter_columns(self, x_local: torch.Tensor, names: list[str]):
        """All-gather [x | z_1 | z_2 ...] along the sequence in one collective; split it again."""
        zs_local = [lf.lora_down(x_local, self.lora_A[n].weight, self._dropout_fn(n)) for n in names]
        if not zs_local:
            return C.gather_sequence(x_local, self.geometry.tp_group), []
        widths = [x_local.shape[-1]] + [z.shape[-1] for z in zs_local]
        full = C.gather_sequence(torch.cat([x_local, *zs_local], dim=-1), self.geometry.tp_group)
        x_full, *zs_full = full.split(widths, dim=-1)
        return x_full, zs_full


class RowParallelLoRA(_MegatronStateMixin, LoRALayerBase):
    """LoRA on a row-parallel base.

    Shards (rank i of t):  W_i [O, I/t] (frozen)   A_i [r, I/t]   B [O, r] replicated
    forward:   p_i = x_i W_i^T + s (drop(x_i) A_i^T) B^T  -> ONE all-reduce (SP off) or ONE
               reduce-scatter along the sequence (SP on), as the base alone; bias after it.
    backward:  dy arrives complete (all-reduce backward is identity; reduce-scatter backward is
               the base's all-gather); dA_i and dx_i complete; dB partial -> finalize_grads.
    input_is_parallel=False: x is split here (backward: all-gather of dx), as Megatron does.
    """

    def forward(self, x: torch.Tensor):
        g = self.geometry
        if not g.input_is_parallel:
            x = C.scatter_last_dim(x, g.tp_group)
        partial = F.linear(x, self.weight)
        for name in self._running_adapters():
            z = lf.lora_down(x, self.lora_A[name].weight, self._dropout_fn(name))
            partial = lf.add_lora_up(partial, z, self.lora_B[name].weight, self.scaling[name])
        if g.sequence_parallel:
            y = C.reduce_scatter_sequence(partial, g.tp_group)
        else:
            y = C.reduce_from_group(partial, g.tp_group)
        if g.skip_bias_add:
            return y, self.bias
        return (y + self.bias if self.bias is not None else y), None


class ReplicatedLoRA(LoRALayerBase):
    """LoRA on a plain nn.Linear (not tensor-parallel): y = x W^T + b + s (drop(x) A^T) B^T.

    Returns a tensor, like the nn.Linear it wraps.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        for name in self._running_adapters():
            z = lf.lora_down(x, self.lora_A[name].weight, self._dropout_fn(name))
            y = lf.add_lora_up(y, z, self.lora_B[name].weight, self.scaling[name])
        return y


LORA_LAYER_FOR_MODE = {"column": ColumnParallelLoRA, "row": RowParallelLoRA, "replicated": ReplicatedLoRA}


def factor_spec(layer: LoRALayerBase, factor: str) -> ShardSpec:
    """ShardSpec of "lora_A" or "lora_B" on this layer."""
    return layer.spec_a if factor == "lora_A" else layer.spec_b
