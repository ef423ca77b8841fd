"""The initial factors of a PiSSA/OLoRA adapter (A0, B0: what `decomposition_init` wrote into the
base as W - s B0 A0), kept per host so a checkpoint can carry them.

Resume and evaluation rebuild the residual base exactly from them, W - s B0 A0 by the same rule
as the initialisation (cheaper than re-running the decomposition, and bit-exact whatever the SVD
would do on another machine); the export converts the trained adapter to a rank-2r LoRA on the
original base from them (checkpoint/decomposition_export.py).  In a checkpoint they are stored
next to the factors as `<module>.<tensor>.<adapter>.initial`, sharded like the factor.

LoftQ records, under the same names, the factors whose product was subtracted before its last
quantisation (zeros for loftq_iter=1): its base Q = dequant(quant(W - B_prev A_prev)) is rebuilt
from them by `decompose.loftq.quantized_base`, the rule the initialisation itself ran.
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping

import torch

from parallel_adapters.adapters import functional as lf
from parallel_adapters.adapters.hosts.base import AdapterHost
from parallel_adapters.adapters.kinds.lora import LORA_A, LORA_B
from parallel_adapters.decompose.loftq import quantized_base
from parallel_adapters.distributed.sharding import ShardedTensor

INITIAL_SUFFIX = ".initial"
_ATTRIBUTE = "decomposition_factors"  # host attribute: adapter name -> {LORA_A: A0 shard, LORA_B: B0 shard}


def record(host: AdapterHost, adapter_name: str, a0: torch.Tensor, b0: torch.Tensor) -> None:
    """Keep this host's initial factor shards (copies, as stored) for `adapter_name`."""
    store = host.__dict__.setdefault(_ATTRIBUTE, {})
    store[adapter_name] = {LORA_A: a0.detach().clone(), LORA_B: b0.detach().clone()}


def recorded(host: AdapterHost, adapter_name: str) -> dict[str, torch.Tensor] | None:
    return host.__dict__.get(_ATTRIBUTE, {}).get(adapter_name)


def initial_name(module_name: str, tensor: str, adapter_name: str) -> str:
    return f"{module_name}.{tensor}.{adapter_name}{INITIAL_SUFFIX}"


def _initial_entries(hosts: Iterator[AdapterHost], adapter_name: str) -> Iterator[tuple[str, AdapterHost, Any]]:
    for host in hosts:
        if host.has_adapter(adapter_name):
            for decl in host.tensor_decls(adapter_name):
                if decl.name in (LORA_A, LORA_B):
                    yield initial_name(host.module_name, decl.name, adapter_name), host, decl


def initial_state_dict(hosts: Iterator[AdapterHost], adapter_name: str) -> dict[str, ShardedTensor]:
    """This rank's recorded initial factor shards under their checkpoint names (empty when the
    adapter was not initialised by a decomposition)."""
    out = {}
    for name, host, decl in _initial_entries(hosts, adapter_name):
        factors = recorded(host, adapter_name)
        if factors is not None:
            out[name] = ShardedTensor(factors[decl.name], decl.spec, decl.global_shape)
    return out


def expected_initial(hosts: Iterator[AdapterHost], adapter_name: str, dtypes: Mapping[str, torch.dtype]
                     ) -> dict[str, tuple]:
    """(ShardSpec, global shape, dtype) of every initial factor this rank would load, as `load_sharded`
    takes them; `dtypes` is the checkpoint's dtype per stored name."""
    return {name: (decl.spec, decl.global_shape, dtypes.get(name, torch.float32))
            for name, _host, decl in _initial_entries(hosts, adapter_name)}


def restore_residual(hosts: Iterator[AdapterHost], adapter_name: str, loaded: Mapping[str, torch.Tensor],
                     loftq_bits: int | None = None) -> None:
    """Write W - s B0 A0 into every host's base shard from the loaded initial factors (the same
    rule as `decomposition_init`, so the residual is bit-identical) and record them; with
    `loftq_bits` (a LoftQ checkpoint), LoftQ's Q from W and the recorded factors instead.  The base
    must be the original: a host that already holds a decomposition is refused."""
    for host in hosts:
        if not host.has_adapter(adapter_name):
            continue
        if recorded(host, adapter_name) is not None:
            raise ValueError(f"{host.module_name}: adapter {adapter_name!r} was already initialised by a "
                             "decomposition (the base holds a residual); build it with init_lora_weights=True "
                             "before loading a PiSSA/OLoRA checkpoint")
        a0 = loaded[initial_name(host.module_name, LORA_A, adapter_name)]
        b0 = loaded[initial_name(host.module_name, LORA_B, adapter_name)]
        if loftq_bits is None:
            subtract_initial(host, adapter_name, a0, b0)
            continue
        with torch.no_grad():
            host.weight.copy_(quantized_base(host.weight, a0, b0, loftq_bits).to(host.weight.dtype))
        record(host, adapter_name, a0, b0)


def subtract_initial(host: AdapterHost, adapter_name: str, a0: torch.Tensor, b0: torch.Tensor) -> None:
    """W_i <- W_i - (s B0 A0)_i on this shard, in float32 or wider, cast back to W's dtype; records A0, B0."""
    scaling = host.hparams(adapter_name)["scaling"]
    with torch.no_grad():
        host.weight.copy_(lf.fold_delta(host.weight, -lf.lora_delta(a0, b0, scaling)))
    record(host, adapter_name, a0, b0)
