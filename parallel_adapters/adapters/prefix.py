"""Prefix tuning (PEFT's PREFIX_TUNING) on a Megatron GPT: n trained key/value pairs in every
attention layer, which every real token attends to as transformers attends to PEFT's
`past_key_values` (mcore/prefix_attention.py: not rotated, real tokens at RoPE positions
n..n+T-1, no mask on the prefix).

Legend: n virtual tokens, L layers, G KV groups (GQA), d head_dim, D = G d (PEFT's token_dim
under its GQA rule), t TP size.

PEFT's layout: one table [n, L * 2 * D]; layer l's keys are columns [2l D, (2l+1) D), its values
[(2l+1) D, (2l+2) D), each group-major (group k at [k d, (k+1) d)).  Here:
- without prefix_projection, layer l holds its own trained tensor [n, 2, D/t] (keys, values) of
  this TP rank's groups, on the pipeline stage that holds the layer: TP-sharded like the layer's
  K/V (ShardSpec dim 2), gradients complete on every rank, nothing to reduce;
- with prefix_projection, PEFT's MLP encoder (Embedding(n, D), Linear(D, h), Tanh,
  Linear(h, 2 L D)) is replicated on every TP rank and pipeline stage; each layer computes only
  its own rows of the last Linear (`layer_columns`), so the encoder's gradients are partials over
  TP x PP, summed in finalize_grads' one all-reduce (over the TP group when PP = 1, over
  Megatron's model-parallel group otherwise).  The checkpoint keeps the encoder from stage 0.
No collective is added per micro-batch.  Logits cover the T real tokens, as PEFT's.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from parallel_adapters.adapters.prefix_encoder import PrefixEncoder, encoded_table, layer_columns, peft_table
from parallel_adapters.config import PrefixTuningConfig
from parallel_adapters.distributed.groups import ParallelGroups
from parallel_adapters.distributed.sharding import REPLICATED, ShardSpec, ShardedTensor
from parallel_adapters.mcore import compat, prefix_attention

KIND_NAME = "prefix_tuning"
"""A checkpoint's adapter_kind for a prefix adapter (model-level: no kinds registry entry)."""
TENSOR_PREFIX = "prefix_tuning."
"""Checkpoint keys: f"{TENSOR_PREFIX}{adapter}.layers.{l}.weight" [n, 2, D] (TP-sharded on dim 2) or
f"{TENSOR_PREFIX}{adapter}.encoder.{PEFT's encoder tensor}" (replicated)."""


class PrefixTuning(nn.Module):
    """The prefix adapters of one GPT stage: `tables.<adapter>.<l>` [n, 2, D/t] for this stage's
    layers l (global numbers), or `encoders.<adapter>` (prefix_projection)."""

    def __init__(self, groups: ParallelGroups, layers: list[int], num_layers: int, token_dim: int):
        super().__init__()
        self.tables = nn.ModuleDict()
        self.encoders = nn.ModuleDict()
        self.configs: dict[str, PrefixTuningConfig] = {}
        self.active: str | None = None
        self.disabled = False
        self.groups, self.layers, self.num_layers, self.token_dim = groups, layers, num_layers, token_dim
        self.columns: dict[int, torch.Tensor] = {}
        self.hooks: list = []

    def running(self) -> str | None:
        return None if self.disabled or self.active not in self.configs else self.active

    def offset(self) -> int:
        name = self.running()
        return 0 if name is None else self.configs[name].num_virtual_tokens

    def layer_prefix(self, layer: int) -> torch.Tensor | None:
        """Layer `layer`'s [n, 2, D/t] of this rank, or None when no prefix runs."""
        name = self.running()
        if name is None:
            return None
        if name in self.tables:
            return self.tables[name][str(layer)]
        rows = self.encoders[name](self.columns[layer])
        return rows.view(rows.shape[0], 2, -1)

    def params(self, name: str) -> dict[str, nn.Parameter]:
        if name in self.tables:
            return {f"layers.{k}.weight": p for k, p in self.tables[name].items()}
        return {f"encoder.{k}": p for k, p in self.encoders[name].named_parameters()} if name in self.encoders else {}


def is_prefix_config(config: object) -> bool:
    return isinstance(config, PrefixTuningConfig)


def prefix_module(model: nn.Module) -> PrefixTuning | None:
    return getattr(model, "prefix_tuning", None)


def model_shape(model: nn.Module) -> tuple[int, int, int]:
    """(L, G, d) of a Megatron GPT: layers, KV groups, head_dim."""
    config = model.config
    return config.num_layers, config.num_query_groups or config.num_attention_heads, config.kv_channels


def resolved_config(config: PrefixTuningConfig, model: nn.Module) -> PrefixTuningConfig:
    """`config` with PEFT's model-decided fields filled in (token_dim D = G d, num_attention_heads
    G, num_layers L, encoder_hidden_size D when unset); ValueError naming a given field that
    disagrees with the model."""
    num_layers, groups, head_dim = model_shape(model)
    decided = {"token_dim": groups * head_dim, "num_attention_heads": groups, "num_layers": num_layers}
    for field, value in decided.items():
        given = getattr(config, field)
        if given is not None and given != value:
            raise ValueError(f"PrefixTuningConfig.{field}={given}, but the model has {value} (PEFT's GQA rule: "
                             "token_dim = KV heads x head_dim, num_attention_heads = KV heads); leave it unset")
    return config.replace(**decided, encoder_hidden_size=config.encoder_hidden_size or decided["token_dim"])


def add_prefix_adapter(model: nn.Module, config: PrefixTuningConfig, name: str,
                       groups: ParallelGroups) -> PrefixTuningConfig:
    """Add prefix adapter `name` to this GPT stage (initialised per config; the one that runs if
    none runs yet); returns the config with the model-decided fields filled in."""
    config = resolved_config(config, model)
    prefix = prefix_module(model)
    if prefix is None:
        layers = [layer.layer_number - 1 for layer in getattr(getattr(model, "decoder", None), "layers", [])]
        prefix = PrefixTuning(groups, layers, config.num_layers, config.token_dim)
        device = next(model.parameters()).device
        prefix.columns = {l: layer_columns(l, config.token_dim, groups.tp_size, groups.tp_rank).to(device)
                          for l in layers}
        model.prefix_tuning = prefix
        prefix.hooks = prefix_attention.install_prefix_hooks(model, prefix.layer_prefix, prefix.offset)
    if name in prefix.configs or prefix.configs:
        raise ValueError(f"prefix adapter {name!r}: this model already has prefix adapter(s) {sorted(prefix.configs)}; "
                         "one prefix adapter per model is supported")
    device = next(model.parameters()).device
    if config.prefix_projection:
        prefix.encoders[name] = _initial_encoder(config).to(device)
    else:
        full = _initial_table(config)
        prefix.tables[name] = nn.ParameterDict({str(l): nn.Parameter(full[:, c.cpu()].view(full.shape[0], 2, -1)
                                                                     .to(device))
                                                for l, c in prefix.columns.items()})
    for key, param in prefix.params(name).items():
        param.adapter_tensor = True  # not a base weight (mcore.hf_bridge skips it)
        if key.startswith("layers."):  # split over TP: every TP rank's share counts in the grad norm
            compat.set_tensor_parallel_attributes(param, ShardSpec(dim=2))
        else:  # the same tensor on every stage: the grad norm counts it on stage 0 only
            param.pipeline_replica = True
    prefix.configs[name] = config
    prefix.active = prefix.active or name
    return config


def _initial_table(config: PrefixTuningConfig) -> torch.Tensor:
    """PEFT's [n, 2 L D] table in float32: N(0, 1) (nn.Embedding's) from config.seed, or zeros;
    drawn whole on every rank, so every layout starts from the same values."""
    shape = (config.num_virtual_tokens, 2 * config.num_layers * config.token_dim)
    if config.init_weights == "zero":
        return torch.zeros(shape)
    return torch.randn(shape, generator=torch.Generator().manual_seed(config.seed))


def _initial_encoder(config: PrefixTuningConfig) -> PrefixEncoder:
    """The MLP with torch's default inits from config.seed (the same on every rank: it is
    replicated), its last Linear zero for init_weights="zero", as PEFT's."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        encoder = PrefixEncoder(config.num_virtual_tokens, config.token_dim, config.encoder_hidden_size,
                                config.num_layers).float()
    if config.init_weights == "zero":
        with torch.no_grad():
            encoder.transform[2].weight.zero_()
            encoder.transform[2].bias.zero_()
    return encoder


def set_active(model: nn.Module, name: str | None) -> None:
    prefix = prefix_module(model)
    if prefix is not None:
        prefix.active = name if name in prefix.configs else None


def set_disabled(model: nn.Module, disabled: bool) -> None:
    prefix = prefix_module(model)
    if prefix is not None:
        prefix.disabled = disabled


def delete(model: nn.Module, name: str) -> None:
    prefix = prefix_module(model)
    if prefix is not None and name in prefix.configs:
        del prefix.configs[name]
        for holder in (prefix.tables, prefix.encoders):
            if name in holder:
                del holder[name]
        prefix.active = None if prefix.active == name else prefix.active


def remove(model: nn.Module) -> None:
    """Take prefix tuning off the model (hooks and tensors)."""
    prefix = prefix_module(model)
    if prefix is not None:
        for hook in prefix.hooks:
            hook.remove()
        del model.prefix_tuning


def trainable_tensors(model: nn.Module, name: str) -> list[nn.Parameter]:
    prefix = prefix_module(model)
    return [] if prefix is None else list(prefix.params(name).values())


def partial_grad_entries(model: nn.Module) -> list[tuple[object, list[nn.Parameter]]]:
    """(group, parameters whose gradient is a per-rank partial): the prefix_projection encoder,
    over TP (PP = 1) or TP x PP; the per-layer tables' gradients are complete."""
    prefix = prefix_module(model)
    g = None if prefix is None else prefix.groups
    if prefix is None or not len(prefix.encoders) or g.tp_size * g.pp_size == 1:
        return []
    params = [p for e in prefix.encoders.values() for p in e.parameters() if p.requires_grad]
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    group = g.tp_group if g.pp_size == 1 else g.pp_group if g.tp_size == 1 else prefix_attention.model_parallel_group()
    return [(group, params)]


def sharded_tensors(model: nn.Module, name: str) -> dict[str, ShardedTensor]:
    """The tables [n, 2, D] of this stage's layers, TP-sharded on dim 2 (each rank its KV
    groups); or the encoder's tensors, replicated, from pipeline stage 0 only."""
    prefix = prefix_module(model)
    if prefix is None or name not in prefix.configs:
        return {}
    out = {}
    for key, tensor in prefix.params(name).items():
        if key.startswith("layers."):
            spec = ShardSpec(dim=2)
            shape = spec.global_shape(tuple(tensor.shape), prefix.groups.tp_size)
            out[f"{TENSOR_PREFIX}{name}.{key}"] = ShardedTensor(tensor.detach(), spec, shape)
        elif prefix.groups.pp_rank == 0:
            out[f"{TENSOR_PREFIX}{name}.{key}"] = ShardedTensor(tensor.detach(), REPLICATED, tuple(tensor.shape))
    return out


def replica_tensors(model: nn.Module, name: str) -> dict[str, ShardedTensor]:
    """What a later pipeline stage loads but does not save: its replica of the encoder."""
    prefix = prefix_module(model)
    if prefix is None or name not in prefix.encoders or prefix.groups.pp_rank == 0:
        return {}
    return {f"{TENSOR_PREFIX}{name}.{k}": ShardedTensor(t.detach(), REPLICATED, tuple(t.shape))
            for k, t in prefix.params(name).items()}


def peft_prompt_embeddings(model: nn.Module, name: str) -> torch.Tensor:
    """PEFT's saved [n, 2 L D] of adapter `name` (one process holding every layer whole): the
    tables in PEFT's layout, or the MLP's output computed in float64 (what PEFT's save writes)."""
    prefix = prefix_module(model)
    if name in prefix.encoders:
        encoder = prefix.encoders[name]
        state = {k: t.detach().cpu() for k, t in encoder.state_dict().items()}
        return encoded_table(state, prefix.num_layers).to(encoder.embedding.weight.dtype)
    return peft_table({int(l): t.detach().cpu() for l, t in prefix.tables[name].items()}).contiguous()


@torch.no_grad()
def load_peft_prompt_embeddings(model: nn.Module, name: str, table: torch.Tensor, source: str) -> None:
    """Copy PEFT's [n, 2 L D] into adapter `name`'s tables: each rank its layers' columns of its KV
    groups (any TP / PP).  An MLP cannot be recovered from its output (PEFT refuses it too)."""
    prefix = prefix_module(model)
    if name in prefix.encoders:
        raise ValueError(f"{source}: a prefix_projection adapter's file holds the MLP's output, not the MLP; load it "
                         "frozen (is_trainable=False: the table, as PEFT's inference mode) or resume a checkpoint")
    config = prefix.configs[name]
    shape = (config.num_virtual_tokens, 2 * prefix.num_layers * prefix.token_dim)
    if tuple(table.shape) != shape:
        raise ValueError(f"{source}: prompt_embeddings has shape {tuple(table.shape)}, the model needs {shape} "
                         "(num_virtual_tokens, 2 x layers x KV heads x head_dim)")
    for layer, param in prefix.tables[name].items():
        columns = prefix.columns[int(layer)].to(table.device)
        param.copy_(table[:, columns].view(shape[0], 2, -1))


def check_not_merging(names: Iterator[str] | list[str], configs: dict) -> None:
    """Prefix tuning adds keys and values to attention, not a weight delta: nothing to merge."""
    prefixes = [n for n in names if is_prefix_config(configs.get(n))]
    if prefixes:
        raise ValueError(f"cannot merge prefix adapter(s) {prefixes}: prefix tuning adds trained keys and values to "
                         "every attention layer and changes no weight, so there is no delta to fold into the base "
                         "(PEFT cannot merge prompt learning adapters either); keep the adapter and run the model "
                         "with it")
