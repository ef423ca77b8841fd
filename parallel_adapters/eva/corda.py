"""CorDA initialisation (PEFT's `preprocess_corda` + `init_lora_weights="corda"`) of an AdapterModel
under TP / SP / PP / DP: `initialize_corda_weights`.

PEFT runs `preprocess_corda(model, config, run_model)` on the base, then `get_peft_model` forms
the factors.  Here the adapter is added first (init "corda" leaves the default factors: the
calibration data is not there yet, as for EVA), then this collects every target's input
covariance with EVA's hooks (eva/hooks.py, adapters disabled; eva/corda_stats.py), decomposes W C
per host (adapters/corda_init.py, decompose/corda.py: collectives over the host's TP group only, never W), replaces the
factors and writes the residual W - s B A into the base, keeping A0, B0 for resume and export
(adapters/decomposition_state.py), as PiSSA does.

Calibration: each batch is split into its sequences, one forward each (PEFT's one call = one
sequence), so any micro-batch or DP split gives the same covariance.  Batches are dicts with
input_ids [B, S] (attention_mask's zeros are left out; PEFT takes every token) or tensors [B, ...]
(every row).  Every TP and PP rank of a DP replica sees the same batches.

Files (`cache_file`, `covariance_file`): safetensors, one per (TP, PP) rank of the layout that
wrote them (`<stem>.tp<i>of<t>.pp<j>of<p><suffix>`; the path itself at TP = PP = 1), written by
DP rank 0, holding this rank's shards under PEFT's keys (`<module>` for C, `<module>.eigens.S_WC`
/ `U_WC` / `V_WC` for the cropped eigens); read back only under the same layout.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from safetensors.torch import load_file, save_file

from parallel_adapters.adapters import corda_init
from parallel_adapters.adapters.corda_init import Eigens
from parallel_adapters.adapters.model import AdapterModel
from parallel_adapters.distributed import collectives as C
from parallel_adapters.eva.corda_stats import LayerCovariance, accumulation_dtype, finish
from parallel_adapters.eva.hooks import ForwardDone, InputCapture, TokenMask, prepare_layer_inputs_fn_language_modeling
from parallel_adapters.eva.initialize import default_forward_fn
from parallel_adapters.eva.state import eva_layers

ForwardFn = Callable[[torch.nn.Module, Any], Any]


@torch.no_grad()
def initialize_corda_weights(model: AdapterModel, dataloader: Iterable | None = None, adapter_name: str = "default",
                             forward_fn: ForwardFn | None = None, show_progress_bar: bool = True) -> AdapterModel:
    """A, B from the CorDA eigens of every LoRA linear host of `adapter_name`, W <- W - s B A.
    `dataloader` may be None when `cache_file` or `covariance_file` already exist.  forward_fn(model,
    batch): as EVA's (None: Megatron's forward, PP through the forward-only schedule, else
    model(**batch) / model(batch)).  Collective: call on every rank."""
    config = model.peft_config.get(adapter_name)
    if config is None or getattr(config, "init_lora_weights", None) != "corda":
        raise ValueError(f"initialize_corda_weights needs adapter {adapter_name!r} with init_lora_weights='corda'")
    cc, groups = config.corda_config, model.groups
    hosts = dict(eva_layers(model, adapter_name))
    for name, host in hosts.items():
        if host.geometry.expert:
            raise ValueError(f"CorDA: {name} is an MoE expert layer (its tokens are routed); exclude it")
    cache = _existing(cc.cache_file, groups)
    if cache is not None:
        eigens = _read_eigens(cache, hosts, adapter_name)
    else:
        covariance_path = _existing(cc.covariance_file, groups)
        if covariance_path is not None:
            covariances = _read_covariances(covariance_path, hosts)
        else:
            if dataloader is None:
                raise ValueError("initialize_corda_weights: pass a dataloader (no CordaConfig.cache_file or "
                                 "covariance_file to read)")
            covariances = collect_covariances(model, dataloader, adapter_name, forward_fn)
            _write(cc.covariance_file, covariances, groups)
        eigens = corda_init.host_eigens(hosts, covariances, config, adapter_name, show_progress_bar or cc.verbose)
        if not cc.prune_temporary_fields:
            for name, host in hosts.items():
                host.__dict__["corda_covariance"] = covariances[name]
        _write(cc.cache_file, {f"{n}.eigens.{k}": t for n, e in eigens.items()
                               for k, t in zip(("S_WC", "U_WC", "V_WC"), e)}, groups)
    for name, host in hosts.items():
        corda_init.install_eigens(host, adapter_name, eigens[name])
    return model


@torch.no_grad()
def collect_covariances(model: AdapterModel, dataloader: Iterable, adapter_name: str = "default",
                        forward_fn: ForwardFn | None = None) -> dict[str, torch.Tensor]:
    """{module: this rank's part of C} for the CorDA targets (module docstring of eva/corda_stats.py)."""
    cc, g = model.peft_config[adapter_name].corda_config, model.groups
    hosts = dict(eva_layers(model, adapter_name))
    stats = {n: LayerCovariance(n, h.geometry.parallel_mode, h.geometry.sequence_parallel, g.tp_group,
                                cc.use_float16_for_covariance) for n, h in hosts.items()}
    batches = iter(dataloader)
    first = next(batches, None)
    by_tokens = isinstance(first, Mapping) and "input_ids" in first
    fns = {n: (prepare_layer_inputs_fn_language_modeling if by_tokens else None) for n in hosts}
    capture = InputCapture(hosts, lambda n, rows: stats[n].add(rows), fns, g.tp_rank, g.tp_size)
    capture.enabled = set(hosts)
    capture.stop_early = forward_fn is None and g.pp_size == 1
    forward_fn = forward_fn or default_forward_fn(model)
    training = model.training
    model.eval()
    try:
        with model.disable_adapter():
            capture.attach()
            for batch in _chain(first, batches):
                for one in _sequences(batch):
                    capture.model_input = TokenMask(_mask(one)) if by_tokens else None
                    capture.start_forward()
                    try:
                        forward_fn(model, one)
                    except ForwardDone:
                        pass
    finally:
        capture.detach()
        model.train(training)
    device = next(model.parameters()).device
    dtype = accumulation_dtype(next(iter(hosts.values())).weight.dtype, cc.use_float16_for_covariance) \
        if hosts else torch.float32
    width = {n: _cov_shape(h) for n, h in hosts.items()}
    return finish(list(stats.values()), width, dtype, device, g.dp_group, g.tp_group)


def _chain(first: Any, rest: Any):
    if first is not None:
        yield first
    yield from rest


def _sequences(batch: Any) -> list[Any]:
    """One calibration call per sequence (PEFT's hook squeezes a batch of one)."""
    if isinstance(batch, Mapping):
        size = batch["input_ids"].shape[0] if "input_ids" in batch else next(iter(batch.values())).shape[0]
        return [{k: (v[j:j + 1] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()} for j in range(size)]
    if isinstance(batch, torch.Tensor):
        return [batch[j:j + 1] for j in range(batch.shape[0])]
    raise ValueError(f"CorDA calibration batches must be dicts or tensors, got {type(batch).__name__}")


def _mask(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    return torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()


def _cov_shape(host: Any) -> tuple[int, int]:
    g = host.geometry
    return (g.in_features // g.tp_size if g.parallel_mode == "row" else g.in_features), g.in_features


# -- files ---------------------------------------------------------------------------------------

def rank_path(path: str | os.PathLike, groups: Any) -> Path:
    """This rank's file of a CorDA cache / covariance file (module docstring)."""
    path = Path(path)
    if groups.tp_size == 1 and groups.pp_size == 1:
        return path
    return path.with_name(f"{path.stem}.tp{groups.tp_rank}of{groups.tp_size}.pp{groups.pp_rank}of{groups.pp_size}"
                          f"{path.suffix}")


def _existing(path: str | None, groups: Any) -> Path | None:
    """This rank's file when every rank has one (PEFT: exists and is not empty), else None."""
    if path is None:
        return None
    mine = rank_path(path, groups)
    here = mine.is_file() and mine.stat().st_size > 0
    return mine if C.all_ranks_agree(here, None) else None


def _write(path: str | None, tensors: Mapping[str, torch.Tensor], groups: Any) -> None:
    if path is not None and groups.dp_rank == 0:
        mine = rank_path(path, groups)
        mine.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: t.detach().contiguous().cpu() for k, t in tensors.items()}, str(mine))


def _read(path: Path, keys: Mapping[str, tuple], what: str) -> dict[str, torch.Tensor]:
    data = load_file(str(path))
    for key, shape in keys.items():
        if key not in data:
            raise ValueError(f"CordaConfig.{what} {path}: no tensor {key!r} (written for another model, target set "
                             "or TP/PP layout?)")
        if shape is not None and tuple(data[key].shape) != shape:
            raise ValueError(f"CordaConfig.{what} {path}: {key!r} has shape {tuple(data[key].shape)}, this layer "
                             f"needs {shape} (another model, rank or TP layout?)")
    return data


def _read_covariances(path: Path, hosts: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    data = _read(path, {n: _cov_shape(h) for n, h in hosts.items()}, "covariance_file")
    return {n: data[n].to(hosts[n].weight.device) for n in hosts}


def _read_eigens(path: Path, hosts: Mapping[str, Any], adapter_name: str) -> dict[str, Eigens]:
    data = _read(path, {f"{n}.eigens.{k}": None for n in hosts for k in ("S_WC", "U_WC", "V_WC")}, "cache_file")
    out = {}
    for name, host in hosts.items():
        r = host.hparams(adapter_name)["r"]
        s = data[f"{name}.eigens.S_WC"]
        if s.shape[0] != r:
            raise ValueError(f"CordaConfig.cache_file {path}: {name} was cached at rank {s.shape[0]}, the adapter "
                             f"has r={r} (PEFT refuses it too)")
        out[name] = tuple(data[f"{name}.eigens.{k}"].to(host.weight.device) for k in ("S_WC", "U_WC", "V_WC"))
    return out
