"""AdapterModel: a Megatron model with named adapters, managed the way PEFT manages them.

Generic over adapter kinds (docs/design.md section 4b): the config picks the kind
(`kinds.kind_for_config`), and everything here iterates over the hosts and each adapter's
declared tensors; no kind's tensor names appear in this module."""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
from torch import nn

from parallel_adapters.adapters.inject import (
    adapted_layers,
    check_patterns_match,
    find_targets,
    unwrap_all,
    wrap_targets,
)
from parallel_adapters.adapters.decomposition_init import initialize_from_weights
from parallel_adapters.adapters.hosts.base import AdapterHost
from parallel_adapters.adapters.kinds import kind_for_config
from parallel_adapters.adapters import grad_sync, prefix, pretrained, prompt, weighted
from parallel_adapters.config import LoraConfig, decomposition_init
from parallel_adapters.distributed.groups import ParallelGroups
from parallel_adapters.distributed.sharding import ShardedTensor
from parallel_adapters.mcore.compat import (
    is_parallel_state_initialized, is_vocab_parallel_embedding, megatron_parallel_groups, parallel_mode_of,
    recomputes_layers, set_tracker_states, tracker_states,
)


TRACKER_KEY = "rng-tracker/"  # prefix of the RNG-tracker states in a checkpoint's per-rank rng file


class AdapterModel(nn.Module):
    """Wraps a Megatron (or plain torch) model whose target layers carry adapters (LoRA, or any
    registered kind).

    Calling it calls the wrapped model.  Only adapter tensors (and what `bias` /
    `modules_to_save` name) are trainable.  After each backward pass and before the optimizer
    step, call `finalize_grads()` to sum TP-replicated tensors' gradients (one all-reduce).
    """

    def __init__(self, model: nn.Module, config: LoraConfig, adapter_name: str, groups: ParallelGroups,
                 autocast_adapter_dtype: bool = True):
        super().__init__()
        self.model = model
        self.groups = groups
        self.autocast_adapter_dtype = autocast_adapter_dtype
        self.peft_config: dict[str, LoraConfig] = {}
        self.active_adapter = adapter_name
        self.add_adapter(adapter_name, config)
        self._input_grad_hook = _require_input_grads(model) if recomputes_layers(model) else None

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    @property
    def base_model(self) -> nn.Module:
        return self.model

    # -- named adapters ------------------------------------------------------------------------

    def add_adapter(self, adapter_name: str, config: LoraConfig) -> None:
        """Add adapter `adapter_name` to the layers `config` targets; it is not made active."""
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; use another adapter_name")
        if prompt.is_prompt_config(config):  # virtual tokens on the embedding, not a per-layer host
            prompt.add_prompt_adapter(self.model, config, adapter_name, self.groups)
            self.peft_config[adapter_name] = config
            self._set_trainable()
            return
        if prefix.is_prefix_config(config):  # keys/values in every attention layer (mcore/prefix_attention.py)
            prefix.add_prefix_adapter(self.model, config, adapter_name, self.groups)
            self.peft_config[adapter_name] = config
            self._set_trainable()
            return
        kind = kind_for_config(config)
        targets = find_targets(self.model, config)
        check_patterns_match(config, kind, targets, local_only=self.groups.pp_size > 1)
        hosts = wrap_targets(self.model, config, kind, self.groups, adapter_name, targets, self.autocast_adapter_dtype)
        initialize_from_weights(hosts, config, adapter_name)  # PiSSA / OLoRA only: W_i <- the residual
        self.peft_config[adapter_name] = config
        self._set_trainable()

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None,
                             svd_clamp: float | None = None, svd_full_matrices: bool = True,
                             svd_driver: str | None = None, density: float | None = None,
                             majority_sign_method: str = "total") -> None:
        """PEFT's LoraModel.add_weighted_adapter, each TP rank writing its own factor shards (never
        a block of the combined update; `adapters/weighted.py` says what each type communicates).
        `svd_full_matrices` cannot change the truncated factors and is accepted for PEFT's signature."""
        weighted.add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp,
                                      svd_full_matrices, svd_driver, density, majority_sign_method)

    def set_adapter(self, adapter_name: str) -> None:
        self._require(adapter_name)
        for _, layer in adapted_layers(self.model):
            if layer.merged_adapters:
                raise ValueError("unmerge the merged adapter(s) before switching the active adapter")
            layer.active_adapters = [adapter_name] if layer.has_adapter(adapter_name) else []
        self.active_adapter = adapter_name
        prompt.set_active(self.model, adapter_name)
        prefix.set_active(self.model, adapter_name)
        self._set_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        self._require(adapter_name)
        for _, layer in adapted_layers(self.model):
            if layer.has_adapter(adapter_name):
                layer.delete_adapter(adapter_name)
        prompt.delete(self.model, adapter_name)
        prefix.delete(self.model, adapter_name)
        del self.peft_config[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = next(iter(self.peft_config), None)
            if self.active_adapter is not None:
                self.set_adapter(self.active_adapter)

    def disable_adapter_layers(self) -> None:
        for _, layer in adapted_layers(self.model):
            layer.disabled = True
        prompt.set_disabled(self.model, True)
        prefix.set_disabled(self.model, True)

    def enable_adapter_layers(self) -> None:
        for _, layer in adapted_layers(self.model):
            layer.disabled = False
        prompt.set_disabled(self.model, False)
        prefix.set_disabled(self.model, False)

    @contextlib.contextmanager
    def disable_adapter(self):
        """Context manager running the base model only."""
        self.disable_adapter_layers()
        try:
            yield
        finally:
            self.enable_adapter_layers()

    # -- merging -------------------------------------------------------------------------------

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters into the base weights (each rank its own shard; no communication)."""
        for name in adapter_names or []:
            self._require(name)
        prompt.check_not_merging(adapter_names or [self.active_adapter], self.peft_config)
        prefix.check_not_merging(adapter_names or [self.active_adapter], self.peft_config)
        layers = [(layer, [n for n in (adapter_names or layer.active_adapters) if layer.has_adapter(n)])
                  for _, layer in adapted_layers(self.model)]
        for layer, names in layers:  # refuse before any weight changes
            layer.check_mergeable([n for n in names if n not in layer.merged_adapters])
        for layer, names in layers:
            layer.merge(names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        """Restore the exact base weights saved at merge time."""
        for _, layer in adapted_layers(self.model):
            layer.unmerge()

    def merge_and_unload(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> nn.Module:
        """Merge, then return the plain model with the base layers back in place."""
        self.merge_adapter(adapter_names, safe_merge=safe_merge)
        for _, layer in adapted_layers(self.model):
            layer.forget_unmerge()
        return self.unload()

    def detach(self) -> dict[str, torch.nn.Parameter]:
        """ALF's detach: unmerge, put the base layers back (the model computes as before it was
        adapted) and hand back every adapter tensor (this rank's, by its state-dict name), kept."""
        self.unmerge_adapter()
        kept = {n: p for n, p in self.model.named_parameters() if getattr(p, "adapter_tensor", False)}
        self.unload()
        return kept

    def unload(self) -> nn.Module:
        """Return the plain model with base layers (current weights) back in place of wrappers."""
        unwrap_all(self.model)
        prompt.remove(self.model)
        prefix.remove(self.model)
        self.peft_config.clear()
        if self._input_grad_hook is not None:
            self._input_grad_hook.remove()
            self._input_grad_hook = None
        return self.model

    # -- training ------------------------------------------------------------------------------

    def finalize_grads(self, data_parallel: bool = False) -> None:
        """Sum the per-rank partial gradients of replicated tensors over the group that splits
        their layer: TP for dense layers, expert-TP for routed MoE experts.  One coalesced
        all-reduce per distinct group of size > 1, so one for a dense model and at most two for a
        MoE model (one when TP and expert-TP hold the same ranks); adapters shared across a layer's
        experts (share_expert_adapters) are also summed over EP: one more (merged into another
        group's when that group holds the same ranks).

        With data_parallel=True (plain torch DP, no DDP/DeepSpeed wrapper, each rank's loss the
        mean over its own rows), also make every trainable gradient the global mean's: sum it over
        its data-parallel group, routed experts' over expert-DP and the rest over DP (one more
        coalesced all-reduce per distinct group of size > 1), then divide by the DP size for both
        (as Megatron's DDP scales experts: an expert's local gradient already sums the tokens of
        every rank in its expert-TP x EP group).
        """
        grad_sync.finalize_grads(self.model, self.groups, data_parallel)

    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, ShardedTensor]:
        """This rank's adapter shards under global Megatron names, with their ShardSpecs."""
        adapter_name = adapter_name or self.active_adapter
        self._require(adapter_name)
        out = {}
        for _, layer in adapted_layers(self.model):
            if layer.has_adapter(adapter_name):
                out.update(layer.sharded_tensors(adapter_name))
        out.update(prompt.sharded_tensors(self.model, adapter_name))
        out.update(prefix.sharded_tensors(self.model, adapter_name))
        return out

    def save_pretrained(self, save_directory: str | os.PathLike, selected_adapters: list[str] | None = None) -> None:
        """PEFT's adapter directory (adapter_model.safetensors + adapter_config.json, which PEFT's
        own from_pretrained also reads), from one process (TP = PP = 1); see `pretrained.py`."""
        pretrained.save_pretrained(self, save_directory, selected_adapters)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: LoraConfig | None = None,
                        autocast_adapter_dtype: bool = True, groups: ParallelGroups | None = None) -> "AdapterModel":
        """PEFT's PeftModel.from_pretrained: `model` with the adapter saved in `model_id` (by
        save_pretrained or by PEFT); frozen unless `is_trainable`."""
        config = pretrained.loadable_config(config or pretrained.read_config(model_id, adapter_name), is_trainable)
        # PiSSA/OLoRA factors pair with the residual base the caller passes: keep W as given
        if decomposition_init(getattr(config, "init_lora_weights", None)) is not None:  # LoRA's field only
            config = config.replace(init_lora_weights=True)
        if getattr(config, "prompt_tuning_init", None) == "TEXT":  # the saved prompt replaces the init
            config = config.replace(prompt_tuning_init="RANDOM")
        adapted = get_adapter_model(model, config, adapter_name, groups, autocast_adapter_dtype)
        pretrained.load_adapter_weights(adapted, model_id, adapter_name)
        if not is_trainable:
            for param in adapted.parameters():
                param.requires_grad_(False)
        return adapted

    def tracker_rng_states(self) -> dict[str, torch.Tensor]:
        """This rank's Megatron RNG-tracker states (the adapters' dropout streams and Megatron's
        own, e.g. attention dropout's), keyed "rng-tracker/<name>", for exact resume."""
        return {f"{TRACKER_KEY}{n}": t for n, t in tracker_states(None).items()}

    def set_tracker_rng_states(self, states: dict[str, torch.Tensor]) -> None:
        """Restore what `tracker_rng_states` returned (other keys of `states` are ignored)."""
        mine = {k[len(TRACKER_KEY):]: t for k, t in states.items() if k.startswith(TRACKER_KEY)}
        if mine:
            set_tracker_states(mine)

    def adapter_layers(self) -> list[tuple[str, AdapterHost]]:
        return adapted_layers(self.model)

    # -- reporting -----------------------------------------------------------------------------

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts of THIS rank's shards."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f} (this rank's shards)")

    # -- internals -----------------------------------------------------------------------------

    def _require(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; have {sorted(self.peft_config)}")

    def _set_trainable(self) -> None:
        """Freeze everything, then unfreeze the active adapter and what its config names."""
        config = self.peft_config.get(self.active_adapter)
        for param in self.model.parameters():
            param.requires_grad_(False)
        if config is None:
            return
        if prompt.is_prompt_config(config) or prefix.is_prefix_config(config):
            for param in [*prompt.trainable_tensors(self.model, self.active_adapter),
                          *prefix.trainable_tensors(self.model, self.active_adapter)]:
                param.requires_grad_(True)
            return
        layers = adapted_layers(self.model)
        for _, layer in layers:
            if layer.has_adapter(self.active_adapter):
                for param in layer.adapter_tensors(self.active_adapter).values():
                    param.requires_grad_(True)
        for param in self._extra_trainable(config, layers):
            param.requires_grad_(True)

    def _extra_trainable(self, config: LoraConfig, layers) -> Iterator[torch.nn.Parameter]:
        if config.bias == "all":
            yield from (p for n, p in self.model.named_parameters() if n.endswith("bias"))
        elif config.bias == "lora_only":
            yield from (layer.bias for _, layer in layers if layer.bias is not None)
        for suffix in config.modules_to_save or []:
            matched = [m for n, m in self.model.named_modules() if n == suffix or n.endswith("." + suffix)]
            if not matched:
                raise ValueError(f"{type(config).__name__}.modules_to_save entry {suffix!r} matches no module")
            for module in matched:
                yield from module.parameters()


def _require_input_grads(model: nn.Module):
    """Under activation recompute, make the (frozen) embedding's output require grad: Megatron's
    reentrant checkpoints give no gradient to parameters inside a recomputed layer whose input
    does not require one, so with a frozen base no adapter would train (PEFT's
    enable_input_require_grads, for the same reason).  Later pipeline stages receive inputs that
    already require grad.  Returns the hook handle, or None without an embedding."""
    embedding = getattr(model, "embedding", None)
    if embedding is None:
        return None

    def hook(module: nn.Module, args, output: torch.Tensor) -> None:
        if isinstance(output, torch.Tensor) and not output.requires_grad:
            output.requires_grad_(True)
    return embedding.register_forward_hook(hook)


def get_adapter_model(model: nn.Module, config: LoraConfig, adapter_name: str = "default",
                      groups: ParallelGroups | None = None, autocast_adapter_dtype: bool = True) -> AdapterModel:
    """Wrap `model`'s target layers with adapters of the kind `config` names (LoRA for a
    LoraConfig) and freeze everything else.

    `groups` defaults to Megatron's initialised parallel state; without one, a plain torch model
    (no Megatron parallel layer) runs as one process, as under PEFT (`default_groups`).
    `autocast_adapter_dtype` (PEFT's argument): on a float16/bfloat16 base, keep the factors in
    float32; they are cast to the activations' dtype where used.  False: the base's dtype.
    """
    if isinstance(model, AdapterModel):
        raise ValueError("model already has adapters: use add_adapter() for another adapter name")
    groups = groups or default_groups(model)
    return AdapterModel(model, config, adapter_name, groups, autocast_adapter_dtype)


def default_groups(model: nn.Module) -> ParallelGroups:
    """Megatron's groups where its parallel state is initialised; else, for a model without
    Megatron parallel layers, one process (TP=PP=DP=1: no collective at all, torch.distributed
    need not exist).  A Megatron model without parallel state is an error: its layers' shards
    would silently be taken for whole tensors."""
    if is_parallel_state_initialized():
        return megatron_parallel_groups()
    for name, module in model.named_modules():
        if parallel_mode_of(module) not in (None, "replicated", "embedding", "conv2d") or is_vocab_parallel_embedding(module):
            raise ValueError(
                f"{name or type(model).__name__} ({type(module).__name__}) is a Megatron parallel layer but "
                "Megatron parallel state is not initialised: call "
                "megatron.core.parallel_state.initialize_model_parallel(...) (or "
                "parallel_adapters.mcore.compat.initialize_model_parallel) before building adapters, "
                "or pass groups=")
    return ParallelGroups.single()
