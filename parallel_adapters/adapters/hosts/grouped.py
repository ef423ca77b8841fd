"""LoRA on megatron's GroupedMLP (`moe_grouped_gemm=True`): per-expert factors on its fused
weight1 / weight2, batched over the local experts (adapters/grouped_experts.py: no loop over
experts).

GroupedMLP keeps its E local experts' fc1 as weight1 viewed [E, H, F1] (expert e computes
x @ w1[e]: w1[e] is the transpose of a SequentialMLP expert's linear_fc1 shard, rows
[gate_i; up_i] when gated) and fc2 as weight2 viewed [E, F2, H].  Its input is the dispatcher's
tokens sorted by local expert (`tokens_per_expert` rows each).

`GroupedExpertsHost` replaces the GroupedMLP in the model.  It registers weight1/weight2 under
their own names (base state-dict keys unchanged) and two AdapterHosts, `linear_fc1` (column
geometry, as a SequentialMLP expert's fc1) and `linear_fc2` (row), whose factors are stacked per
local expert: lora_A [E, r, in_i], lora_B [E, out_i, r] (this rank's expert-TP shards).  Its
forward is GroupedMLP's written out (as the linear hosts compute the base matmul themselves):
gmm(x, w1) + delta_1, activation x probs, gmm(., w2) + delta_2; the deltas are
`grouped_lora_delta`.  No collective: the dispatcher's all-gather / reduce-scatter carry the
adapters, as for SequentialMLP experts.  GroupedMLP's own bf16 assertion is not reached (the
kernel's limit: on a GPU, grouped_gemm still wants bf16).

Names: `sharded_tensors` gives local expert e's slice under the name a SequentialMLP expert's
tensor has (`...mlp.experts.local_experts.<global e>.linear_fc1.lora_A.<adapter>.weight`, the
per-expert ShardSpec), as a view of the stacked tensor, so checkpoints (loading copies into the
view), resharding, PEFT export and merge are shared with SequentialMLP experts; each expert's
factors are drawn from that name's seed, so both hosts start from the same adapter.

LoRA only: other kinds (DoRA included) and lora_dropout > 0 are refused by name.
"""
from __future__ import annotations

import types
from typing import Mapping, Sequence

import torch
from torch import nn

from parallel_adapters.adapters.grouped_experts import grouped_lora_delta
from parallel_adapters.adapters.hosts.base import AdapterHost, WrapsBase
from parallel_adapters.adapters.kinds.protocol import (
    INPUT_COLUMNS, LOCAL_ADDEND, PARTIAL_ADDEND, AdapterKind, AdapterSettings,
)
from parallel_adapters.distributed.geometry import LinearGeometry
from parallel_adapters.distributed.sharding import ShardedTensor
from parallel_adapters.mcore.moe import grouped_gmm


class GroupedLinearHost(AdapterHost):
    """One fused weight of a GroupedMLP (fc1 or fc2) with per-expert LoRA stacked over its experts.

    `weight` is the fused base Parameter (owned by GroupedExpertsHost, not registered here);
    `expert_names[e]` is local expert e's module name as a SequentialMLP expert's
    (`...local_experts.<global e>.linear_fc1`); `geometry` is one expert's layer's."""

    SLOTS = frozenset({INPUT_COLUMNS, LOCAL_ADDEND, PARTIAL_ADDEND})
    """LoRA's, all computed at once by grouped_lora_delta (the only kind accepted here)."""

    def __init__(self, weight: nn.Parameter, geometry: LinearGeometry, module_name: str,
                 expert_names: Sequence[str], autocast_adapter_dtype: bool = True):
        super().__init__(types.SimpleNamespace(weight=weight, bias=None), geometry, module_name, autocast_adapter_dtype)
        del self._parameters["weight"]  # GroupedExpertsHost registers it (as weight1 / weight2)
        self.__dict__["weight"] = weight
        self.expert_names = tuple(expert_names)

    def expert_view(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The fused weight as [E, in_i, out_i] (GroupedMLP's gmm operand: expert e's W_e^T)."""
        w, g, experts = (self.weight if weight is None else weight), self.geometry, len(self.expert_names)
        return w.view(experts, g.in_features, -1) if g.parallel_mode == "column" else w.view(experts, -1, g.out_features)

    def add_grouped_adapter(self, name: str, kind: AdapterKind, settings: Sequence[AdapterSettings],
                            full_tensors: Sequence[Mapping[str, torch.Tensor]], dp_rank: int = 0, pp_rank: int = 0) -> None:
        """Register adapter `name` from each local expert's FULL tensors (and settings, which must
        agree: one r / alpha per fused weight); this rank keeps its shards, stacked."""
        if kind.name != "lora":
            raise NotImplementedError(f"{self.module_name}: GroupedMLP experts take LoRA only, not {kind.name!r} "
                                      "(build the model with moe_grouped_gemm=False for other kinds)")
        if name in self.kinds:
            raise ValueError(f"{self.module_name}: adapter {name!r} is already applied to this module")
        first = settings[0]
        for s, expert in zip(settings, self.expert_names):
            if s.hparams != first.hparams:
                raise ValueError(f"{expert}: {kind.describe(s.hparams)} differs from the other experts' "
                                 f"{kind.describe(first.hparams)}; a GroupedMLP weight takes one r and alpha")
        if first.dropout > 0:
            raise NotImplementedError(f"{self.module_name}: LoraConfig.lora_dropout={first.dropout} on GroupedMLP "
                                      "experts is not supported (use 0, or moe_grouped_gemm=False)")
        g = self.geometry
        decls = kind.tensors(g, first.hparams)
        self._check_declarations(kind, first.hparams, decls)
        for decl in decls:
            stacked = torch.stack([decl.spec.shard(full[decl.name], g.tp_rank, g.tp_size) for full in full_tensors])
            holder = self._holder(stacked, decl, trainable=True)
            if decl.spec.dim is not None:
                holder.weight.partition_dim = decl.spec.dim + 1  # the expert axis comes first
            self._table(decl.name)[name] = holder
            if decl.spec_attribute:
                self._kind_attributes.add(decl.spec_attribute)
                setattr(self, decl.spec_attribute, decl.spec)
        self._set_hparams(name, kind, first.hparams)
        self.kinds[name] = kind
        self._declared[name] = tuple(d.name for d in decls)
        self._dropout[name] = None
        if not self.active_adapters:
            self.active_adapters = [name]

    def add_adapter(self, *args, **kwargs) -> None:
        raise NotImplementedError(f"{self.module_name}: use add_grouped_adapter (one full tensor set per expert)")

    def replace_tensors(self, *args, **kwargs) -> None:
        raise NotImplementedError(f"{self.module_name}: data-driven inits (EVA) are not supported on GroupedMLP experts")

    def sharded_tensors(self, name: str) -> dict[str, ShardedTensor]:
        """Local expert e's shards under its SequentialMLP name (views of the stacked tensors)."""
        tensors = self.adapter_tensors(name)
        return {f"{expert}.{d.name}.{name}.weight": ShardedTensor(tensors[d.name].detach()[e], d.spec, d.global_shape)
                for d in self.tensor_decls(name) for e, expert in enumerate(self.expert_names)}

    def delta(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor | None:
        """Sum of the running adapters' addends for rows x sorted by expert (None: no adapter runs)."""
        out = None
        for name in ([] if self.disabled else self.active_adapters):
            if name not in self.kinds or name in self.merged_adapters:
                continue
            t = self.adapter_tensors(name)
            d = grouped_lora_delta(x.to(self.factor_dtype), tokens_per_expert, t["lora_A"], t["lora_B"],
                                   self.hparams(name)["scaling"]).to(x.dtype)
            out = d if out is None else out + d
        return out

    def merge(self, names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Each expert's W_e += s B_e A_e, batched (the fused layout holds W_e^T)."""
        names = [n for n in (names or self.active_adapters) if n not in self.merged_adapters]
        if not names:
            return
        with torch.no_grad():
            merged = self.expert_view().detach().clone()
            for name in names:
                t = self.adapter_tensors(name)
                delta = torch.bmm(t["lora_B"], t["lora_A"]) * self.hparams(name)["scaling"]  # [E, out_i, in_i]
                merged = (merged.to(delta.dtype) + delta.transpose(1, 2)).to(merged.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"{self.module_name}: merging adapter(s) {names} gives non-finite weights")
            if self._unmerged_weight is None:
                self._unmerged_weight = self.weight.detach().clone()
            self.expert_view().copy_(merged)
        self.merged_adapters.extend(names)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        return {}  # the fused base weight's entries come from GroupedExpertsHost


class GroupedExpertsHost(WrapsBase):
    """Stands in for a GroupedMLP: its weights, the two adapter hosts, and its forward (see top)."""

    def __init__(self, base: nn.Module, fc1: GroupedLinearHost, fc2: GroupedLinearHost):
        super().__init__()
        self.weight1, self.weight2 = base.weight1, base.weight2
        object.__setattr__(self, "_base", base)  # outside the module tree, as AdapterHost's base
        self.linear_fc1, self.linear_fc2 = fc1, fc2

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor, probs: torch.Tensor):
        base = self._base
        if base.config.moe_apply_probs_on_input or base.activation_recompute:
            raise NotImplementedError("GroupedMLP experts with adapters: moe_apply_probs_on_input and moe_act "
                                      "recompute are not supported")
        h = self._apply(self.linear_fc1, x, tokens_per_expert)
        if h.is_cuda:
            h = base.activation_func_with_probs(h, probs.unsqueeze(-1))
        else:  # the same math eagerly: megatron's jit_fuser would torch.compile it (seconds, on the CPU)
            act = base.config.activation_func
            if base.config.gated_linear_unit:
                gate, up = torch.chunk(h, 2, dim=-1)
                h = ((act(gate) * up) * probs.unsqueeze(-1)).to(h.dtype)
            else:
                h = (act(h) * probs.unsqueeze(-1)).to(h.dtype)
        return self._apply(self.linear_fc2, h, tokens_per_expert), None

    @staticmethod
    def _apply(host: GroupedLinearHost, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:  # no token routed here: no kernel call (as GroupedMLP), weights kept in the graph
            y = x @ host.expert_view()[0]
        else:
            y = grouped_gmm(x, host.expert_view(), tokens_per_expert)
        delta = host.delta(x, tokens_per_expert)
        return y if delta is None else y + delta


def grouped_geometries(base: nn.Module, groups) -> tuple[LinearGeometry, LinearGeometry]:
    """(fc1, fc2) geometry of ONE expert of a GroupedMLP, as its SequentialMLP linear_fc1 (column,
    rows [gate; up] in two chunks when gated) and linear_fc2 (row) would have, on expert-TP."""
    config = base.config
    hidden, ffn = config.hidden_size, config.moe_ffn_hidden_size
    gated = bool(config.gated_linear_unit)
    common = dict(tp_group=groups.etp_group, tp_size=groups.etp_size, tp_rank=groups.etp_rank, sequence_parallel=False,
                  gather_output=False, input_is_parallel=True, skip_bias_add=False, expert=True)
    return (LinearGeometry("column", hidden, ffn * (2 if gated else 1), 2 if gated else 1, **common),
            LinearGeometry("row", ffn, hidden, 1, **common))


def wrap_grouped_experts(base: nn.Module, groups, module_name: str, expert_indices: Sequence[int],
                         autocast_adapter_dtype: bool = True) -> GroupedExpertsHost:
    """The GroupedExpertsHost for GroupedMLP `base` at global module path `module_name`
    (`...mlp.experts`), whose local experts have the global indices `expert_indices`."""
    fc1, fc2 = grouped_geometries(base, groups)
    hosts = []
    for fc, geometry, weight in (("linear_fc1", fc1, base.weight1), ("linear_fc2", fc2, base.weight2)):
        names = [f"{module_name}.local_experts.{e}.{fc}" for e in expert_indices]
        hosts.append(GroupedLinearHost(weight, geometry, f"{module_name}.{fc}", names, autocast_adapter_dtype))
    return GroupedExpertsHost(base, *hosts)
