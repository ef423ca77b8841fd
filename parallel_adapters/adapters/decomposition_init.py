"""Initialise LoRA adapters from their base weights (PEFT's `init_lora_weights="pissa"`,
`"pissa_niter_K"`, `"olora"`, `"loftq"`), each TP rank from its own weight shard (docs/design.md
section 4b).  LoftQ writes its de-quantised Q (not a residual) into the base shard, after every
host's block layout was checked (`_initialize_loftq`).

Runs once, when the adapter is added (`AdapterModel.add_adapter`), after every target got its
host: per host, in model order, the factors come from `decompose.pissa` / `decompose.olora`
(collectives over the host's TP group only, never W itself), replace the placeholder factors,
and the residual W_i - s (B A)_i (this shard's part of s B A) is written into the frozen base
shard, computed in float32 or wider from the factors as stored and cast back to W's dtype (as
PEFT).  Kinds that derive tensors from the weight (DoRA's magnitude, which PEFT allows with both
inits) recompute them from the residual and the new factors.  A progress bar over the layers
shows on world rank 0.

Every rank of a TP group reaches the same hosts in the same order (the model's structure is the
same on each), so the collectives pair up.
"""
from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch
from tqdm import tqdm

from parallel_adapters.adapters import decomposition_state, functional as lf
from parallel_adapters.adapters.hosts.base import AdapterHost
from parallel_adapters.adapters.kinds.lora import LORA_A, LORA_B
from parallel_adapters.config import LoraConfig, decomposition_init
from parallel_adapters.decompose import loftq, olora, pissa, quantize
from parallel_adapters.distributed import collectives
from parallel_adapters.distributed.sharding import ShardSpec


def initialize_from_weights(hosts: Sequence[AdapterHost], config: Any, adapter_name: str,
                            show_progress: bool = True) -> None:
    """Run the decomposition `config.init_lora_weights` names on every host holding `adapter_name`
    (nothing for other inits)."""
    method = decomposition_init(getattr(config, "init_lora_weights", None))  # other kinds' configs: none
    if method is None or method[0] == "corda":  # CorDA needs calibration data: eva/corda.py
        return
    hosts = [h for h in hosts if h.has_adapter(adapter_name)]
    if method[0] == "loftq":  # refused before any host changes, alike on every rank (geometry only)
        for host in hosts:
            g = host.geometry
            quantize.check_block_layout(host.module_name, g.parallel_mode, g.out_features, g.in_features,
                                        g.tp_size, g.chunks)
    enabled = show_progress and collectives.group_rank(None) == 0 and len(hosts) > 1
    for host in tqdm(hosts, desc=f"{config.init_lora_weights} init", disable=not enabled, leave=False):
        _initialize_host(host, method, config, adapter_name)


def _initialize_host(host: AdapterHost, method: tuple[str, int | None], config: LoraConfig,
                     adapter_name: str) -> None:
    g = host.geometry
    hparams = host.hparams(adapter_name)
    r, scaling = hparams["r"], hparams["scaling"]
    weight = host.weight.detach()
    in_spec = ShardSpec(dim=0, chunks=g.chunks) if g.parallel_mode == "row" else ShardSpec()
    in_index = in_spec.shard(torch.arange(g.in_features, device=weight.device), g.tp_rank, g.tp_size)
    name, niter = method
    if name == "loftq":
        _initialize_loftq(host, config, adapter_name, weight, r, in_index)
        return
    if name == "olora":
        a, b = olora.olora_factors(weight, g.parallel_mode, r, in_index, g.tp_group)
    else:
        seed = lf.factor_seed(config.seed, host.module_name, adapter_name, "pissa")
        generator = torch.Generator().manual_seed(seed)
        a, b, report = pissa.pissa_factors(weight, g.parallel_mode, r, scaling, niter, generator, in_index,
                                           g.tp_group)
        if not report.converged:
            warnings.warn(f"{host.module_name}: PiSSA's SVD did not converge in {report.iterations} iterations "
                          f"(subspace moved {report.distance:.2e} in the last one; the top-{r} singular values "
                          "are nearly tied): the factors span an approximate top-r subspace", stacklevel=3)
    tensors = {n: t.detach().clone() for n, t in host.adapter_tensors(adapter_name).items()}
    tensors[LORA_A], tensors[LORA_B] = a, b
    host.replace_tensors(adapter_name, tensors, hparams)
    stored = host.adapter_tensors(adapter_name)
    decomposition_state.subtract_initial(host, adapter_name, stored[LORA_A], stored[LORA_B])  # kept for resume/export
    host.refresh_initial_tensors(adapter_name)


def _initialize_loftq(host: AdapterHost, config: LoraConfig, adapter_name: str, weight: torch.Tensor, r: int,
                      in_index: torch.Tensor) -> None:
    """PEFT's LoftQ on this shard: A, B replace the factors, Q the base shard (cast to its dtype); the
    factors subtracted before the last quantisation are recorded, from which Q is rebuilt on resume."""
    g = host.geometry
    seed = lf.factor_seed(config.seed, host.module_name, adapter_name, "loftq")
    bits, iters = config.loftq_config.loftq_bits, config.loftq_config.loftq_iter
    result = loftq.loftq_factors(weight, g.parallel_mode, r, bits, iters, torch.Generator().manual_seed(seed),
                                 in_index, g.tp_group)
    if not result.converged:
        warnings.warn(f"{host.module_name}: LoftQ's SVD of W - Q did not converge (the top-{r} singular values of "
                      "the quantisation error are nearly tied): the factors span an approximate top-r subspace",
                      stacklevel=4)
    tensors = {n: t.detach().clone() for n, t in host.adapter_tensors(adapter_name).items()}
    tensors[LORA_A], tensors[LORA_B] = result.a, result.b
    host.replace_tensors(adapter_name, tensors, host.hparams(adapter_name))
    with torch.no_grad():
        host.weight.copy_(result.q.to(host.weight.dtype))
    decomposition_state.record(host, adapter_name, result.a_prev, result.b_prev)  # Q's rebuild (resume, merge)
    host.refresh_initial_tensors(adapter_name)
