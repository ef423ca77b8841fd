"""CorDA's per-host step (eva/corda.py gathers the covariances): the eigens of each host from its
weight shard and its part of C (`decompose/corda.py`, collectives over the host's TP group only),
then the factors installed as PiSSA's are (adapters/decomposition_init.py): W_i <- W_i - s (B A)_i,
A0 and B0 recorded for resume and export.  Hosts in model order, so the collectives pair up.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from tqdm import tqdm

from parallel_adapters.adapters import decomposition_state, functional as lf
from parallel_adapters.adapters.hosts.base import AdapterHost
from parallel_adapters.adapters.kinds.lora import LORA_A, LORA_B
from parallel_adapters.decompose import corda as corda_math
from parallel_adapters.distributed import collectives
from parallel_adapters.distributed.sharding import ShardSpec

Eigens = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def host_eigens(hosts: Mapping[str, AdapterHost], covariances: Mapping[str, torch.Tensor], config: Any,
                adapter_name: str, show: bool) -> dict[str, Eigens]:
    """{module: (S [r], U shard, V shard)} (PEFT's cropped CordaEigens, our signs).  Collective."""
    out = {}
    enabled = show and collectives.group_rank(None) == 0 and len(hosts) > 1
    for name, host in tqdm(hosts.items(), desc="corda init", disable=not enabled, leave=False):
        g = host.geometry
        in_spec = ShardSpec(dim=0, chunks=g.chunks) if g.parallel_mode == "row" else ShardSpec()
        in_index = in_spec.shard(torch.arange(g.in_features, device=host.weight.device), g.tp_rank, g.tp_size)
        generator = torch.Generator().manual_seed(lf.factor_seed(config.seed, name, adapter_name, "corda"))
        s, u, v, _ = corda_math.corda_eigens(host.weight.detach(), covariances[name], g.parallel_mode,
                                             host.hparams(adapter_name)["r"], config.corda_config.corda_method,
                                             generator, in_index, g.tp_group)
        out[name] = (s, u, v)
    return out


def install_eigens(host: AdapterHost, adapter_name: str, eigens: Eigens) -> None:
    """A = sqrt(S/s) V^T, B = U sqrt(S/s) replace the host's factor shards; the residual
    W_i - s (B A)_i goes into its base shard (float32 or wider, cast back); A0, B0 recorded."""
    hparams = host.hparams(adapter_name)
    a, b = corda_math.corda_factors(*eigens, hparams["scaling"])
    tensors = {n: t.detach().clone() for n, t in host.adapter_tensors(adapter_name).items()}
    tensors[LORA_A], tensors[LORA_B] = a, b
    host.replace_tensors(adapter_name, tensors, hparams)
    stored = host.adapter_tensors(adapter_name)
    decomposition_state.subtract_initial(host, adapter_name, stored[LORA_A], stored[LORA_B])
    host.refresh_initial_tensors(adapter_name)
