"""AdapterHost: a frozen base layer plus named adapters of any registered kind (docs/design.md
section 4b).  Subclasses, one per parallel mode (`hosts/linear.py`), own the forward and its ONE
collective and list the slots they implement in `SLOTS`; this class keeps the bookkeeping they
share: each adapter's declared tensors (this rank's shards), hyperparameters, input dropout,
active/merged state, merge and unmerge.

Naming, generic over kinds: a declared tensor `T` of adapter `n` is the parameter `T.n.weight`
(an `nn.ModuleDict` named `T` on the host, as PEFT's `lora_A.<adapter>.weight`); a kind's
hyperparameter `h` is the dict `host.h` keyed by adapter name (`host.r["default"]`).

The base layer's parameters are registered on the host under their original names (`weight`,
`bias`), and the base module itself is kept out of the module tree, so base state-dict keys are
unchanged and Megatron code that reads `layer.weight` or other attributes keeps working.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from parallel_adapters.adapters import functional as lf
from parallel_adapters.adapters.hosts.dropout import (
    SeededDropout, WeightDropout, input_dropout, tp_replicated_input, weight_dropout, weight_dropped,
)
from parallel_adapters.adapters.kinds.protocol import (
    REDUCTION_PAYLOAD, AdapterKind, AdapterSettings, AdapterView, TensorDecl,
)
from parallel_adapters.distributed import collectives
from parallel_adapters.distributed.sharding import ShardedTensor
from parallel_adapters.mcore.compat import (
    LinearGeometry, TrackerDropout, base_bias, set_tensor_parallel_attributes,
)


_WEIGHT_CALLS = "/weight-dropout"
"""Suffix of a weight dropout's entry in `dropout_calls` (the input dropout's key is the adapter name)."""


class _Holder(nn.Module):
    """Holds one adapter tensor as `.weight`, so keys read `<tensor>.<adapter>.weight` as in PEFT."""

    def __init__(self, tensor: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(tensor)


class WrapsBase(nn.Module):
    """Megatron / state-dict compatibility of a module standing in for `_base` (kept outside the
    module tree, set by the subclass): the base's attributes and distributed-checkpoint entries."""

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


class AdapterHost(WrapsBase):
    """Bookkeeping shared by all hosts: named adapters, their tensors and hyperparameters, merge state."""

    SLOTS: frozenset[str] = frozenset()
    """The slots (kinds/protocol.py) this host's forward implements."""

    def __init__(self, base: nn.Module, geometry: LinearGeometry, module_name: str,
                 autocast_adapter_dtype: bool = True):
        super().__init__()
        self.weight = base.weight  # None on an output layer tied to the input embedding (forward's `weight`)
        dtype = base.weight.dtype if base.weight is not None else base.config.params_dtype
        self.factor_dtype = lf.factor_dtype(dtype, autocast_adapter_dtype)
        self._device = base.weight.device if base.weight is not None else next(base.parameters(), torch.empty(0)).device
        self.bias = base_bias(base)
        # Set after weight/bias: the attribute fallback to the base would shadow them otherwise.
        object.__setattr__(self, "_base", base)  # outside the module tree on purpose (see top)
        self.geometry = geometry
        self.module_name = module_name
        self.kinds: dict[str, AdapterKind] = {}
        self._declared: dict[str, tuple[str, ...]] = {}  # adapter -> its tensor names, in declaration order
        self._kind_attributes: set[str] = set()  # attributes made for kinds: tensor tables, hparam dicts, specs
        self._dropout: dict[str, SeededDropout | TrackerDropout | None] = {}
        self._weight_dropout: dict[str, WeightDropout | None] = {}  # LyCORIS' module / rank dropout
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self._unmerged_weight: torch.Tensor | None = None
        self._unmerged_bias: torch.Tensor | None = None
        self.disabled = False
        self.tied_weight = False
        """Set by injection on a tied embedding / output layer: merging is refused."""

    # -- adapters ----------------------------------------------------------------------------

    def add_adapter(self, name: str, kind: AdapterKind, settings: AdapterSettings,
                    full_tensors: Mapping[str, torch.Tensor], dp_rank: int = 0, pp_rank: int = 0) -> None:
        """Register adapter `name` of `kind` from its FULL tensors; this rank keeps its shards."""
        if name in self.kinds:
            raise ValueError(f"{self.module_name}: adapter {name!r} is already applied to this module")
        g = self.geometry
        decls = kind.tensors(g, settings.hparams)
        self._check_declarations(kind, settings.hparams, decls)
        shards = {d.name: d.spec.shard(full_tensors[d.name], g.tp_rank, g.tp_size) for d in decls}
        for decl in decls:
            self._table(decl.name)[name] = self._holder(shards[decl.name], decl, trainable=True)
            if decl.spec_attribute:
                self._kind_attributes.add(decl.spec_attribute)
                setattr(self, decl.spec_attribute, decl.spec)
        self._set_hparams(name, kind, settings.hparams)
        self.kinds[name] = kind
        self._declared[name] = tuple(d.name for d in decls)
        self._dropout[name] = (input_dropout(settings.dropout, settings.seed, kind.dropout_stream, self.module_name,
                                             name, g, dp_rank, pp_rank) if settings.dropout > 0 else None)
        self._weight_dropout[name] = weight_dropout(settings, kind.dropout_stream, self.module_name, name, g,
                                                    dp_rank, pp_rank)
        self.refresh_initial_tensors(name)
        if not self.active_adapters:
            self.active_adapters = [name]

    def refresh_initial_tensors(self, name: str) -> None:
        """Set the tensors the kind derives from the base weight (`initial_tensors`: DoRA's
        magnitude), at add time and again after an initialisation changed the weight or factors."""
        initial = self.kinds[name].initial_tensors(self._reduced_view(name, self.weight))
        with torch.no_grad():
            for tensor_name, local in initial.items():
                self.adapter_tensors(name)[tensor_name].copy_(local)

    def replace_tensors(self, name: str, local: Mapping[str, torch.Tensor], hparams: Mapping[str, Any]) -> None:
        """Swap in new SHARDS of adapter `name`'s tensors (shapes may follow new hyperparameters,
        e.g. another rank from EVA), keeping whether they train."""
        if name not in self.kinds:
            raise ValueError(f"{self.module_name}: no adapter {name!r}")
        kind, g = self.kinds[name], self.geometry
        _check_hparams(kind, hparams)
        decls = kind.tensors(g, hparams)
        if sorted(local) != sorted(self._declared[name]):
            raise ValueError(f"{self.module_name}: adapter {name!r} has tensors {list(self._declared[name])}, "
                             f"got {sorted(local)}")
        got = [tuple(local[d.name].shape) for d in decls]
        want = [d.spec.local_shape(d.global_shape, g.tp_size) for d in decls]
        if got != want:
            raise ValueError(f"{self.module_name}: factor shards {', '.join(map(str, got))} do not match "
                             f"{kind.describe(hparams)}: expected {', '.join(map(str, want))}")
        trainable = next(iter(self.adapter_tensors(name).values())).requires_grad
        for decl in decls:
            self._table(decl.name)[name] = self._holder(local[decl.name].detach(), decl, trainable)
        self._set_hparams(name, kind, hparams)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"{self.module_name}: unmerge adapter {name!r} before deleting it")
        kind = self.kinds.pop(name)
        for tensor_name in self._declared.pop(name):
            del self._table(tensor_name)[name]
        for hparam in kind.hyperparameters:
            self.__dict__[hparam].pop(name)
        self._dropout.pop(name)
        self._weight_dropout.pop(name)
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def share_adapter_of(self, owner: "AdapterHost", name: str) -> None:
        """Make adapter `name` here use `owner`'s tensors (the same Parameters: one gradient,
        accumulated over both layers); the owner's are marked `expert_shared` (finalize_grads
        sums them over EP too).  ValueError when the two adapters' hyperparameters differ."""
        if owner.hparams(name) != self.hparams(name):
            raise ValueError(f"{self.module_name}: adapter {name!r} ({self.kinds[name].describe(self.hparams(name))}) "
                             f"cannot share {owner.module_name}'s ({owner.kinds[name].describe(owner.hparams(name))})")
        for tensor_name in self._declared[name]:
            owner._table(tensor_name)[name].weight.expert_shared = True
            self._table(tensor_name)[name] = owner._table(tensor_name)[name]

    def has_adapter(self, name: str) -> bool:
        return name in self.kinds

    def adapter_tensors(self, name: str) -> dict[str, nn.Parameter]:
        """This rank's shards of adapter `name`, by declared tensor name, in declaration order."""
        return {t: self._modules[t][name].weight for t in self._declared[name]}

    def tensor_decls(self, name: str) -> tuple[TensorDecl, ...]:
        kind = self.kinds[name]
        return kind.tensors(self.geometry, self.hparams(name))

    def hparams(self, name: str) -> dict[str, Any]:
        return {h: self.__dict__[h][name] for h in self.kinds[name].hyperparameters}

    def sharded_tensors(self, name: str) -> dict[str, ShardedTensor]:
        """This rank's shards of adapter `name` under global names `<module>.<tensor>.<name>.weight`."""
        tensors = self.adapter_tensors(name)
        return {f"{self.module_name}.{d.name}.{name}.weight": ShardedTensor(tensors[d.name].detach(), d.spec,
                                                                              d.global_shape)
                for d in self.tensor_decls(name)}

    @property
    def input_is_tp_replicated(self) -> bool:
        return tp_replicated_input(self.geometry)

    def _running_views(self, weight: torch.Tensor | None = None) -> list[AdapterView]:
        if self.disabled:
            return []
        views = [self.view(n, weight) for n in self.active_adapters if n in self.kinds and n not in self.merged_adapters]
        return weight_dropped(views, self._weight_dropout, self.training, self._device)

    def view(self, name: str, weight: torch.Tensor | None = None) -> AdapterView:
        """What the kind's slot functions see of adapter `name` on this rank (`weight`: the base
        weight shard it applies to, by default the host's)."""
        kind, dropout = self.kinds[name], self._dropout[name]
        return AdapterView(name, kind, kind.slots(self.geometry.parallel_mode), self.adapter_tensors(name),
                           self.hparams(name), dropout if (dropout is not None and self.training) else None,
                           self.geometry, self.weight if weight is None else weight, bias=self.bias)

    def _reduced_view(self, name: str, weight: torch.Tensor) -> AdapterView:
        """The view with the kind's `payload_rows` summed over TP: ONE collective, at add and merge
        time only (never per micro-batch), and only for kinds that fill reduction_payload."""
        view = self.view(name, weight)
        if REDUCTION_PAYLOAD not in view.slots:
            return view
        rows = view.kind.payload_rows(view).detach().clone().contiguous()
        return dataclasses.replace(view, reduced=collectives.all_reduce_(rows, self.geometry.tp_group))

    def dropout_calls(self) -> dict[str, int]:
        """Masks drawn so far per adapter on an nn.Linear (for resume; Megatron layers' streams are
        RNG-tracker states, saved with `AdapterModel.tracker_rng_states`)."""
        calls = {name: d.calls for name, d in self._dropout.items() if isinstance(d, SeededDropout)}
        weight = {f"{name}{_WEIGHT_CALLS}": d.source.calls for name, d in self._weight_dropout.items()
                  if d is not None and isinstance(d.source, SeededDropout)}
        return {**calls, **weight}

    def set_dropout_calls(self, calls: dict[str, int]) -> None:
        for name, count in calls.items():
            if isinstance(self._dropout.get(name), SeededDropout):
                self._dropout[name].calls = int(count)
            weight = self._weight_dropout.get(name.removesuffix(_WEIGHT_CALLS)) if name.endswith(_WEIGHT_CALLS) else None
            if weight is not None and isinstance(weight.source, SeededDropout):
                weight.source.calls = int(count)

    def partial_grad_parameters(self) -> Iterator[nn.Parameter]:
        """Trainable parameters whose gradient is a per-rank partial sum over TP: the TP-replicated
        adapter tensors (finalize_grads sums them once per step)."""
        if self.geometry.tp_size == 1:
            return
        for name in self.kinds:
            tensors = self.adapter_tensors(name)
            for decl in self.tensor_decls(name):
                partial = decl.spec.replicated if decl.partial_grad is None else decl.partial_grad
                if partial and tensors[decl.name].requires_grad:
                    yield tensors[decl.name]
        # Under sequence parallelism a row layer's bias is added to sequence shards.
        if (self.geometry.parallel_mode == "row" and self.geometry.sequence_parallel
                and self.bias is not None and self.bias.requires_grad):
            yield self.bias

    # -- merge ---------------------------------------------------------------------------------

    def merge(self, names: list[str] | None = None, safe_merge: bool = False) -> None:
        """W_i += each adapter's per-shard delta: each rank merges its own shard, with no
        communication except for kinds whose delta needs summed rows (DoRA on a row host).
        `names=None`: the active adapters; an empty list (none of the named ones here): nothing."""
        names = [n for n in (self.active_adapters if names is None else names) if n not in self.merged_adapters]
        if not names:
            return
        self.check_mergeable(names)
        with torch.no_grad():
            merged = self.weight.detach().clone()
            bias = None if self.bias is None else self.bias.detach().clone()
            for name in names:
                view = self._reduced_view(name, merged)
                merged = self.kinds[name].merged_weight(view, merged)
                bias = None if bias is None else self.kinds[name].merged_bias(view, bias)
            if safe_merge and not (torch.isfinite(merged).all() and (bias is None or torch.isfinite(bias).all())):
                raise ValueError(f"{self.module_name}: merging adapter(s) {names} gives non-finite weights")
            if self._unmerged_weight is None:
                self._unmerged_weight = self.weight.detach().clone()
                self._unmerged_bias = None if self.bias is None else self.bias.detach().clone()
            self.weight.copy_(merged)
            if bias is not None:
                self.bias.copy_(bias)  # IA3 scales the bias with the output
        self.merged_adapters.extend(names)

    def check_mergeable(self, names: list[str]) -> None:
        """ValueError if this layer's weight is tied to another layer's (the input embedding and the
        output layer of a model with tied embeddings): merging would change both layers."""
        if self.tied_weight and names:
            raise ValueError(
                f"{self.module_name}: cannot merge adapter(s) {names}: the input embedding and the output layer "
                "share one weight (tied embeddings), so a merge would change the other layer too (PEFT merges "
                "into the shared table anyway and warns). Untie the embeddings first, or keep the adapter unmerged.")

    def unmerge(self) -> None:
        """Restore the exact pre-merge base weight."""
        if self._unmerged_weight is None:
            return
        with torch.no_grad():
            self.weight.copy_(self._unmerged_weight)
            if self._unmerged_bias is not None:
                self.bias.copy_(self._unmerged_bias)
        self._unmerged_weight = self._unmerged_bias = None
        self.merged_adapters = []

    def forget_unmerge(self) -> None:
        """Drop the pre-merge copy (the merge becomes permanent)."""
        self._unmerged_weight = self._unmerged_bias = None

    def extra_repr(self) -> str:
        g = self.geometry
        adapters = ", ".join(f"{n}: {k.describe(self.hparams(n))}" for n, k in self.kinds.items())
        return f"{g.parallel_mode}, in={g.in_features}, out={g.out_features}, tp={g.tp_size}, {adapters}"

    # -- internals -----------------------------------------------------------------------------

    def _table(self, tensor_name: str) -> nn.ModuleDict:
        """The ModuleDict holding tensor `tensor_name` of every adapter (made on first use)."""
        table = self._modules.get(tensor_name)
        if table is None:
            table = nn.ModuleDict()
            self._kind_attributes.add(tensor_name)
            self.add_module(tensor_name, table)
        return table

    def _set_hparams(self, name: str, kind: AdapterKind, hparams: Mapping[str, Any]) -> None:
        for hparam in kind.hyperparameters:
            if hparam not in self._kind_attributes:
                self._kind_attributes.add(hparam)
                self.__dict__[hparam] = {}
            self.__dict__[hparam][name] = hparams[hparam]

    def _check_declarations(self, kind: AdapterKind, hparams: Mapping[str, Any], decls: tuple[TensorDecl, ...]) -> None:
        """Before anything changes: the host implements every slot the kind fills, and the kind's
        names (tensors, hyperparameters, published specs) shadow none of the host's attributes."""
        missing = sorted(kind.slots(self.geometry.parallel_mode) - self.SLOTS)
        if missing:
            raise NotImplementedError(f"{self.module_name}: adapter kind {kind.name!r} fills slot(s) {missing}, "
                                      f"which {type(self).__name__} does not implement yet")
        _check_hparams(kind, hparams)
        names = [*kind.hyperparameters, *(d.name for d in decls), *(d.spec_attribute for d in decls if d.spec_attribute)]
        for attribute in names:
            taken = (hasattr(type(self), attribute) or attribute in self.__dict__ or attribute in self._parameters
                     or attribute in self._modules)
            if taken and attribute not in self._kind_attributes:
                raise ValueError(f"{self.module_name}: adapter kind {kind.name!r} declares {attribute!r}, "
                                 "which the host uses")

    def _holder(self, tensor: torch.Tensor, decl: TensorDecl, trainable: bool) -> _Holder:
        # contiguous whatever the source's strides (PiSSA's factors are transposed products): DeepSpeed
        # broadcasts and flattens parameters as raw bytes
        local = tensor.to(device=self._device, dtype=self.factor_dtype)
        holder = _Holder(local.clone(memory_format=torch.contiguous_format))
        holder.weight.requires_grad_(trainable)
        holder.weight.adapter_tensor = True  # how code below adapters/ (mcore.hf_bridge) tells it from the base
        set_tensor_parallel_attributes(holder.weight, decl.spec)
        return holder


def _check_hparams(kind: AdapterKind, hparams: Mapping[str, Any]) -> None:
    if set(hparams) != set(kind.hyperparameters):
        raise ValueError(f"adapter kind {kind.name!r}: hyperparameters {sorted(hparams)} do not match "
                         f"the declared {list(kind.hyperparameters)}")
