"""save_checkpoint / load_checkpoint: an AdapterModel (+ optimizer, RNG, caller state) <-> a
sharded checkpoint directory.  Run on every rank.

The optimizer state is flattened under the adapter tensor names (`<name>/exp_avg`, ...), so it is
tied to parameters by name rather than by position, and checked against the model on load.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from parallel_adapters.adapters import decomposition_state as ds, prefix, prompt
from parallel_adapters.adapters.model import AdapterModel
from parallel_adapters.checkpoint.base_model import BASE_PATH_KEY, BaseModel
from parallel_adapters.checkpoint.layout import CheckpointError
from parallel_adapters.checkpoint.files import read_json
from parallel_adapters.checkpoint.reader import CheckpointReader
from parallel_adapters.checkpoint.sharded import load_sharded, load_train_state, restore_rng_state, save_sharded
from parallel_adapters.config import decomposition_init
from parallel_adapters.config.lora import LoftQConfig

_GROUP_KEY = "param_groups/"


CHECKPOINT_ONLY_KEYS = ("adapter_name", "adapter_kind", "tp_size", "pp_size", BASE_PATH_KEY)
"""adapter_config.json keys that are not LoraConfig fields."""


def checkpoint_config(model: AdapterModel, adapter_name: str | None = None, base: BaseModel | None = None) -> dict:
    """adapter_config.json: the LoraConfig (PEFT field names) plus the parallel layout and, when
    the base was imported from an HF checkpoint, its path (PEFT's base_model_name_or_path)."""
    name = adapter_name or model.active_adapter
    config = model.peft_config[name].to_dict()
    config.pop("eva_config", None) if config.get("eva_config") is None else None
    config.pop("loftq_config", None) if config.get("loftq_config") is None else None
    config.update(adapter_name=name, adapter_kind=_kind_name(model, name), tp_size=model.groups.tp_size,
                  pp_size=model.groups.pp_size)
    if base is not None and base.name_or_path is not None:
        config[BASE_PATH_KEY] = base.name_or_path
    return config


def _kind_name(model: AdapterModel, adapter_name: str) -> str:
    if prompt.is_prompt_config(model.peft_config[adapter_name]):  # a model-level adapter, on no layer
        return prompt.KIND_NAME
    if prefix.is_prefix_config(model.peft_config[adapter_name]):
        return prefix.KIND_NAME
    kinds = {layer.kinds[adapter_name].name for _, layer in model.adapter_layers() if layer.has_adapter(adapter_name)}
    if len(kinds) != 1:
        raise ValueError(f"adapter {adapter_name!r} has kinds {sorted(kinds)} on this rank; expected one")
    return kinds.pop()


def checkpoint_tensors(model: AdapterModel) -> dict:
    """This rank's tensors of a checkpoint of the active adapter: its shards and, for a decomposition init,
    the initial factors the residual base is rebuilt from (every engine's save writes both)."""
    hosts = [layer for _, layer in model.adapter_layers()]
    return {**model.adapter_state_dict(), **ds.initial_state_dict(hosts, model.active_adapter)}


def save_checkpoint(model: AdapterModel, directory: str | Path, optimizer: torch.optim.Optimizer | None = None,
                    extra_state: dict | None = None, base: BaseModel | None = None) -> Path:
    """Save this rank's adapter shards (and optimizer/RNG/extra state) atomically; every rank calls
    it.  `base`: the base model the checkpoint records (checkpoint/base_model.py)."""
    tensors = checkpoint_tensors(model)
    optimizer_state = _flatten_optimizer(model, optimizer) if optimizer is not None else None
    return save_sharded(directory, tensors, model.groups, checkpoint_config(model, base=base),
                        optimizer_state=optimizer_state, extra_state=extra_state, rng_state=True,
                        rng_extra=model.tracker_rng_states(), base=base, expert_names=_expert_names(model))


def _expert_names(model: AdapterModel) -> set[str]:
    """The active adapter's tensors on routed MoE experts (held per EP rank)."""
    name = model.active_adapter
    return {n for _, layer in model.adapter_layers() if layer.geometry.expert and layer.has_adapter(name)
            for n in layer.sharded_tensors(name)}


def load_checkpoint(model: AdapterModel, directory: str | Path, optimizer: torch.optim.Optimizer | None = None,
                    restore_rng: bool = True) -> dict | None:
    """Restore adapter weights (resharding to this TP size), then the optimizer (same layout
    only) and the RNG state (when the layout matches).  Returns the saved extra_state."""
    # a later pipeline stage's replica of a prefix encoder: loaded here, saved by stage 0
    current = {**model.adapter_state_dict(), **prefix.replica_tensors(model.model, model.active_adapter)}
    expected = {n: (t.spec, t.global_shape, t.local.dtype) for n, t in current.items()}
    with CheckpointReader(directory) as reader:
        initial = {n: info.dtype for n, info in reader.tensors.items() if n.endswith(ds.INITIAL_SUFFIX)}
        stored_init = reader.config().get("init_lora_weights")
        stored_loftq = reader.config().get("loftq_config") if stored_init == "loftq" else None
    hosts = [layer for _, layer in model.adapter_layers()]
    if not initial and decomposition_init(stored_init) is not None:
        raise CheckpointError(f"{directory}: adapter initialised with init_lora_weights={stored_init!r} but the "
                              "checkpoint holds no initial factors (*.initial): the residual base cannot be rebuilt")
    if initial:  # PiSSA/OLoRA: the factors were trained on the residual W - s B0 A0
        expected.update(ds.expected_initial(hosts, model.active_adapter, initial))
    loaded = load_sharded(directory, model.groups, expected, expert_names=_expert_names(model))
    with torch.no_grad():
        for name, tensor in loaded.items():
            if name in current:
                current[name].local.copy_(tensor)
    if initial:
        ds.restore_residual(hosts, model.active_adapter, loaded, stored_loftq and stored_loftq["loftq_bits"])
        name = model.active_adapter
        loftq = {"loftq_config": LoftQConfig(**stored_loftq)} if stored_loftq else {}  # LoftQ: Q rebuilt
        model.peft_config[name] = model.peft_config[name].replace(init_lora_weights=stored_init, **loftq)
    with CheckpointReader(directory) as reader:
        train_state = reader.index["train_state"]
        same_layout = (reader.tp_size, reader.pp_size, reader.dp_size) == (
            model.groups.tp_size, model.groups.pp_size, model.groups.dp_size)
        extra = (read_json(reader.verified_path(train_state["extra_state"]), "extra_state")
                 if train_state["extra_state"] is not None else None)
    if optimizer is not None:
        # Per-rank state: load_train_state refuses (naming both layouts) if TP/PP/DP changed.
        optim_state, rng_state, _ = load_train_state(directory, model.groups)
        if optim_state is None:
            raise CheckpointError(f"{directory}: no optimizer state was saved, but an optimizer was given")
        _restore_optimizer(model, optimizer, optim_state)
    elif restore_rng and same_layout and train_state["rng"]:
        _, rng_state, _ = load_train_state(directory, model.groups)
    else:
        rng_state = None
    if restore_rng and rng_state is not None:
        restore_all_rng(model, rng_state)
    return extra


def restore_all_rng(model: AdapterModel, rng_state: dict[str, torch.Tensor]) -> None:
    """A rank's saved RNG state: torch / python / numpy, and the model's Megatron RNG-tracker
    states (dropout streams), the two halves that `save_checkpoint` wrote together."""
    restore_rng_state(rng_state)
    model.set_tracker_rng_states(rng_state)


def _param_names(model: AdapterModel) -> dict[int, str]:
    tensors = {**model.adapter_state_dict(), **prefix.replica_tensors(model.model, model.active_adapter)}
    by_ptr = {t.local.data_ptr(): name for name, t in tensors.items()}
    return {id(p): by_ptr[p.data_ptr()] for p in model.parameters() if p.data_ptr() in by_ptr}


def _flatten_optimizer(model: AdapterModel, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    names = _param_names(model)
    flat: dict[str, Any] = {}
    for g_index, group in enumerate(optimizer.param_groups):
        for key, value in group.items():
            if key != "params" and isinstance(value, (int, float, bool, str, type(None))):
                flat[f"{_GROUP_KEY}{g_index}/{key}"] = value
        for param in group["params"]:
            if id(param) not in names:
                raise CheckpointError("the optimizer holds a parameter that is not an adapter factor; "
                                      "save_checkpoint saves adapter optimizers only")
            for key, value in optimizer.state.get(param, {}).items():
                flat[f"{names[id(param)]}/{key}"] = value.detach().clone() if torch.is_tensor(value) else value
    return flat


def _restore_optimizer(model: AdapterModel, optimizer: torch.optim.Optimizer, flat: dict[str, Any]) -> None:
    names = _param_names(model)
    for g_index, group in enumerate(optimizer.param_groups):
        for key in list(group):
            saved = flat.get(f"{_GROUP_KEY}{g_index}/{key}")
            if key != "params" and saved is not None:
                group[key] = saved
        for param in group["params"]:
            prefix = f"{names[id(param)]}/"
            state = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
            if not state:
                continue
            optimizer.state[param] = {k: (v.to(param.device) if torch.is_tensor(v) else v) for k, v in state.items()}
