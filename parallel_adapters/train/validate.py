"""Run-config checks that need no process group: values, files, and the parallel layout.

`validate_run_config(config)` and `check_parallel_layout(world_size, config)` run before anything
is built, so a bad value, a missing file or an impossible TP x PP fails in a second with the
dotted key's name, instead of after a model load or inside a collective.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from dataclasses import dataclass
from typing import Optional
from pathlib import Path

from parallel_adapters.train.data import ByteTokenizer
from parallel_adapters.train.engine import check_deepspeed_layout, load_deepspeed_json
from parallel_adapters.train.lr import LRSchedule
from parallel_adapters.train.prefix_run import validate_prefix_run
from parallel_adapters.train.prompt_run import check_sequence_split, validate_prompt_run
from parallel_adapters.config import EvaConfig, LoraConfig, decomposition_init
from parallel_adapters.train.run_config import (MODEL_DTYPES, MOE_DISPATCHERS, MOE_DROP_POLICIES, ROUTER_DTYPES,
                                                CheckpointSection, LoggingSection, ModelSection, MoeSection, RunConfig,
                                                adapter_kind_name)

HF_DECIDES = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
              "vocab_size", "max_position_embeddings", "rotary_base", "tie_embeddings", "init_seed")
"""model.* keys that a model.hf_checkpoint decides (architecture and weights)."""
HF_DECIDES_MOE = ("num_experts", "topk", "ffn_hidden_size")
"""moe.* keys that a model.hf_checkpoint's config.json decides (the others are training options)."""


@dataclass(frozen=True)
class Layout:
    """The parallel layout and batch split of a run (a pure function of world size and config)."""

    world_size: int
    tensor: int
    pipeline: int
    data: int
    micro_batch: int
    accumulation: int
    """Micro-batches per optimizer step on each DP rank."""
    expert: int = 1
    """Expert-parallel size (MoE)."""
    expert_tensor: Optional[int] = None
    """Expert-tensor-parallel size (MoE); None: the tensor size."""

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.accumulation * self.data


# ----------------------------------------------------------------------------------------------

def check_parallel_layout(world_size: int, config: RunConfig) -> Layout:
    """ValueError naming parallel.tensor / parallel.pipeline / parallel.data when the layout cannot
    run on `world_size` ranks, or optim.global_batch when it does not split."""
    p, m, o = config.parallel, config.model, config.optim
    for key, value in (("parallel.tensor", p.tensor), ("parallel.pipeline", p.pipeline)):
        if value < 1:
            raise ValueError(f"{key} must be >= 1, got {value}")
    model_parallel = p.tensor * p.pipeline
    if world_size % model_parallel:
        raise ValueError(f"parallel.tensor={p.tensor} x parallel.pipeline={p.pipeline} = {model_parallel} "
                         f"does not divide the world size {world_size}")
    data = world_size // model_parallel
    if p.data is not None and p.data != data:
        raise ValueError(f"parallel.data={p.data}: parallel.tensor={p.tensor} x parallel.pipeline={p.pipeline} "
                         f"x parallel.data={p.data} = {model_parallel * p.data} != world size {world_size}")
    if m.hf_checkpoint is None:
        if m.num_layers % p.pipeline:
            raise ValueError(f"model.num_layers={m.num_layers} does not divide by parallel.pipeline={p.pipeline}")
        for key, value in (("num_attention_heads", m.num_attention_heads), ("num_query_groups", m.num_query_groups),
                           ("ffn_hidden_size", m.ffn_hidden_size)):
            if value % p.tensor:
                raise ValueError(f"model.{key}={value} does not divide by parallel.tensor={p.tensor}")
    check_sequence_split(config)  # data.seq_len (+ adapter.num_virtual_tokens) over parallel.tensor under SP
    expert, expert_tensor = _check_expert_layout(world_size, config)
    if config.deepspeed is not None:
        check_deepspeed_layout(p.pipeline)
        if expert > 1 or expert_tensor != p.tensor:
            raise ValueError(f"deepspeed: the DeepSpeed engine is not supported with parallel.expert={expert} / "
                             f"parallel.expert_tensor={expert_tensor} (its ZeRO reductions and TP sum do not know "
                             "the expert-parallel groups); use the torch engine (deepspeed: null) or "
                             "parallel.expert=1 with parallel.expert_tensor = parallel.tensor")
    per_step = o.micro_batch * data
    global_batch = o.global_batch if o.global_batch is not None else per_step
    if global_batch % per_step:
        raise ValueError(f"optim.global_batch={global_batch} must be a multiple of optim.micro_batch="
                         f"{o.micro_batch} x data-parallel size {data}")
    return Layout(world_size, p.tensor, p.pipeline, data, o.micro_batch, global_batch // per_step, expert,
                  expert_tensor if num_experts(config) is not None else None)


def num_experts(config: RunConfig) -> Optional[int]:
    """Routed experts per layer: moe.num_experts, or the HF checkpoint's config.json's (None: dense)."""
    hf = config.model.hf_checkpoint
    if hf is None:
        return config.moe.num_experts
    path = Path(hf, "config.json")
    if not path.is_file():
        return None  # validate_run_config names model.hf_checkpoint
    hf_config = json.loads(path.read_text())
    return hf_config.get("num_experts") or hf_config.get("num_local_experts") or None


def _check_expert_layout(world_size: int, config: RunConfig) -> tuple[int, int]:
    """(EP, ETP) sizes; ValueError naming parallel.expert / parallel.expert_tensor / moe.* when the
    MoE layers cannot split that way on `world_size` ranks."""
    p, moe = config.parallel, config.moe
    expert = p.expert
    expert_tensor = p.tensor if p.expert_tensor is None else p.expert_tensor
    for key, value in (("parallel.expert", expert), ("parallel.expert_tensor", expert_tensor)):
        if value < 1:
            raise ValueError(f"{key} must be >= 1, got {value}")
    experts = num_experts(config)
    if experts is None:
        if expert > 1 or p.expert_tensor is not None:
            raise ValueError("parallel.expert and parallel.expert_tensor split the routed experts of MoE layers; "
                             "this model is dense: set moe.num_experts (or use an HF MoE checkpoint), or remove them")
        if getattr(config.adapter, "share_expert_adapters", False):
            raise ValueError("adapter.share_expert_adapters=true shares one adapter among a MoE layer's routed experts; "
                             "this model is dense: remove it (or set moe.num_experts / use an HF MoE checkpoint)")
        return expert, expert_tensor
    expert_model_parallel = expert_tensor * expert * p.pipeline
    if world_size % expert_model_parallel:
        raise ValueError(f"parallel.expert_tensor={expert_tensor} x parallel.expert={expert} x parallel.pipeline="
                         f"{p.pipeline} = {expert_model_parallel} does not divide the world size {world_size}")
    where = "moe.num_experts" if config.model.hf_checkpoint is None else "the HF checkpoint's num_experts"
    if experts % expert:
        raise ValueError(f"{where}={experts} does not divide by parallel.expert={expert}")
    ffn = moe.ffn_hidden_size or config.model.ffn_hidden_size
    if config.model.hf_checkpoint is None and ffn % expert_tensor:
        raise ValueError(f"moe.ffn_hidden_size={ffn} (one expert's) does not divide by parallel.expert_tensor="
                         f"{expert_tensor}")
    if p.tensor > 1 and not p.sequence_parallel:  # megatron's MoELayer refuses to train otherwise
        raise ValueError(f"parallel.sequence_parallel must be true for a MoE model at parallel.tensor={p.tensor}")
    return expert, expert_tensor


def validate_run_config(config: RunConfig) -> None:
    """Value checks load_run_config cannot do by type alone; ValueError names the dotted key."""
    o, d, m, c = config.optim, config.data, config.model, config.checkpoint
    LRSchedule(o.lr, o.steps, o.schedule, o.warmup_steps)  # optim.lr / steps / schedule / warmup_steps
    _positive({"optim.micro_batch": o.micro_batch, "data.seq_len": d.seq_len, "logging.every": config.logging.every,
               "checkpoint.keep_last": c.keep_last, "model.num_layers": m.num_layers,
               "model.hidden_size": m.hidden_size, "model.vocab_size": m.vocab_size,
               "model.num_attention_heads": m.num_attention_heads, "model.num_query_groups": m.num_query_groups})
    if not isinstance(config.adapter, LoraConfig) and config.eva is not None:
        raise ValueError(f"eva: EVA initialises LoRA adapters only; adapter.kind is "
                         f"{adapter_kind_name(config.adapter)!r} (remove the eva: section)")
    if decomposition_init(getattr(config.adapter, "init_lora_weights", None)) is not None and config.eva is not None:
        raise ValueError(f"eva: adapter.init_lora_weights={config.adapter.init_lora_weights!r} initialises the "
                         "factors by a decomposition; EVA would replace it (remove the eva: section or the init)")
    if getattr(config.adapter, "init_lora_weights", None) == "loftq" and config.export.verify_with_peft:
        raise ValueError("export.verify_with_peft with adapter.init_lora_weights='loftq': the exported adapter "
                         "applies to the LoftQ-de-quantised base, not to the Hugging Face base PEFT would load "
                         "(check the merged model instead: merge folds it into the de-quantised base)")
    if (decomposition_init(getattr(config.adapter, "init_lora_weights", None)) is not None
            and config.export.verify_with_peft and config.model.hf_checkpoint is None):
        raise ValueError(f"export.verify_with_peft with adapter.init_lora_weights={config.adapter.init_lora_weights!r} "
                         "needs model.hf_checkpoint: the run's base holds the residual W - s*B0*A0, and the "
                         "converted adapter loads on the original base")
    validate_prompt_run(config)
    validate_prefix_run(config)
    if o.global_batch is not None and o.global_batch < 1:
        raise ValueError(f"optim.global_batch must be >= 1, got {o.global_batch}")
    for key, value in (("optim.weight_decay", o.weight_decay), ("optim.grad_clip", o.grad_clip),
                       ("checkpoint.save_every", c.save_every)):
        if value < 0:
            raise ValueError(f"{key} must be >= 0, got {value}")
    if o.nonfinite not in ("stop", "skip"):
        raise ValueError(f"optim.nonfinite must be 'stop' or 'skip', got {o.nonfinite!r}")
    _finite(config)
    if m.dtype not in MODEL_DTYPES:
        hint = " (float16 needs loss scaling, which this trainer does not do)" if m.dtype == "float16" else ""
        raise ValueError(f"model.dtype must be one of {sorted(MODEL_DTYPES)}, got {m.dtype!r}{hint}")
    for key, p in (("model.attention_dropout", m.attention_dropout), ("model.hidden_dropout", m.hidden_dropout)):
        if p is not None and not 0.0 <= p < 1.0:
            raise ValueError(f"{key} must be in [0, 1), got {p}")
    if m.recompute not in (None, "full", "selective"):
        raise ValueError(f"model.recompute must be null, 'full' or 'selective', got {m.recompute!r}")
    if d.tokenizer not in ("auto", "byte", "hf"):
        raise ValueError(f"data.tokenizer must be 'auto', 'byte' or 'hf', got {d.tokenizer!r}")
    for i, path in enumerate(d.paths):
        if not Path(path).is_file():
            raise ValueError(f"data.paths[{i}]: {str(path)!r} does not exist or is not a file")
    if m.hf_checkpoint is not None and not Path(m.hf_checkpoint, "config.json").is_file():
        raise ValueError(f"model.hf_checkpoint: {m.hf_checkpoint!r} is not a directory with a config.json")
    if m.hf_checkpoint is None:
        if d.tokenizer == "hf":
            raise ValueError("data.tokenizer='hf' needs model.hf_checkpoint (the tokenizer's directory)")
        if m.vocab_size < ByteTokenizer.vocab_size:
            raise ValueError(f"model.vocab_size={m.vocab_size} is smaller than the byte tokenizer's "
                             f"{ByteTokenizer.vocab_size} ids")
        if m.hidden_size % m.num_attention_heads or m.num_attention_heads % m.num_query_groups:
            raise ValueError(f"model.hidden_size={m.hidden_size} must divide by model.num_attention_heads="
                             f"{m.num_attention_heads}, which must divide by model.num_query_groups="
                             f"{m.num_query_groups}")
        if d.seq_len > m.max_position_embeddings:
            raise ValueError(f"data.seq_len={d.seq_len} exceeds model.max_position_embeddings="
                             f"{m.max_position_embeddings}")
    if config.deepspeed is not None:
        load_deepspeed_json(config.deepspeed)
    _check_moe_values(config.moe)
    if c.save_every > 0 and c.directory is None:
        raise ValueError("checkpoint.save_every needs checkpoint.directory")
    if config.export.verify_with_peft and config.export.peft_dir is None:
        raise ValueError("export.verify_with_peft needs export.peft_dir")
    if config.export.peft_dir is not None and c.directory is None:
        raise ValueError("export.peft_dir needs checkpoint.directory (the export reads the final checkpoint)")
    _no_ignored_keys(config)


def _no_ignored_keys(config: RunConfig) -> None:
    """Refuse a key set away from its default where nothing would read it (it would be ignored)."""
    m, a = config.model, config.adapter
    if m.hf_checkpoint is not None:
        defaults = ModelSection()
        for key in HF_DECIDES:
            if getattr(m, key) != getattr(defaults, key):
                raise ValueError(f"model.{key}={getattr(m, key)!r} is ignored with model.hf_checkpoint (its "
                                 f"config.json and weights decide it); remove model.{key}")
    moe, moe_defaults = config.moe, MoeSection()
    for key in (HF_DECIDES_MOE if m.hf_checkpoint is not None else ()):
        if getattr(moe, key) != getattr(moe_defaults, key):
            raise ValueError(f"moe.{key}={getattr(moe, key)!r} is ignored with model.hf_checkpoint (its config.json "
                             f"decides it); remove moe.{key}")
    if moe.grouped_gemm and m.hf_checkpoint is not None:
        raise ValueError("moe.grouped_gemm=true with model.hf_checkpoint: the import fills SequentialMLP experts "
                         "(one module per expert); remove moe.grouped_gemm")
    if num_experts(config) is None:
        for f in dataclasses.fields(MoeSection):
            if f.name != "num_experts" and getattr(moe, f.name) != getattr(moe_defaults, f.name):
                raise ValueError(f"moe.{f.name} needs a MoE model (moe.num_experts, or an HF MoE checkpoint); "
                                 f"this one is dense: remove moe.{f.name}")
    if config.logging.every != LoggingSection().every and config.logging.metrics_jsonl is None:
        raise ValueError("logging.every needs logging.metrics_jsonl (the per-step log it thins out)")
    if config.checkpoint.keep_last != CheckpointSection().keep_last and config.checkpoint.directory is None:
        raise ValueError("checkpoint.keep_last needs checkpoint.directory")
    if not isinstance(a, LoraConfig):
        return  # EVA's keys are LoRA's (the eva: section is refused above)
    inline = a.eva_config if a.eva_config != EvaConfig() else None  # init "eva" fills in EvaConfig()
    if inline is not None and config.eva is not None and inline != config.eva:
        raise ValueError("adapter.eva_config and eva both configure EVA, differently; keep one (the eva: section "
                         "is the run config's place for it)")
    if inline is not None and config.eva is None and a.init_lora_weights != "eva":
        raise ValueError(f"adapter.eva_config is ignored with adapter.init_lora_weights={a.init_lora_weights!r}; "
                         "set adapter.init_lora_weights=eva or use the eva: section")


def _check_moe_values(moe: MoeSection) -> None:
    if moe.num_experts is not None:
        _positive({"moe.num_experts": moe.num_experts})
        if not 1 <= moe.topk <= moe.num_experts:
            raise ValueError(f"moe.topk={moe.topk} must be in 1..moe.num_experts={moe.num_experts}")
    if moe.ffn_hidden_size is not None:
        _positive({"moe.ffn_hidden_size": moe.ffn_hidden_size})
    if moe.aux_loss_coeff < 0:
        raise ValueError(f"moe.aux_loss_coeff must be >= 0, got {moe.aux_loss_coeff}")
    if moe.router_dtype is not None and moe.router_dtype not in ROUTER_DTYPES:
        raise ValueError(f"moe.router_dtype must be null or one of {list(ROUTER_DTYPES)}, got {moe.router_dtype!r}")
    if moe.dispatcher not in MOE_DISPATCHERS:
        raise ValueError(f"moe.dispatcher must be one of {list(MOE_DISPATCHERS)}, got {moe.dispatcher!r}")
    if moe.dispatcher != "allgather" and not _cuda_available():
        raise ValueError(f"moe.dispatcher={moe.dispatcher!r} needs CUDA (Megatron creates CUDA streams for it); "
                         "this machine has no GPU: use moe.dispatcher=allgather")
    if moe.grouped_gemm and not (_cuda_available() and importlib.util.find_spec("grouped_gemm") is not None):
        raise ValueError("moe.grouped_gemm=true needs CUDA and the grouped_gemm package (Megatron's GroupedMLP runs "
                         "its gmm kernels); this machine lacks one: remove moe.grouped_gemm (SequentialMLP experts)")
    if moe.capacity_factor is not None and not moe.capacity_factor > 0:
        raise ValueError(f"moe.capacity_factor must be > 0 or null, got {moe.capacity_factor}")
    if moe.drop_policy not in MOE_DROP_POLICIES:
        raise ValueError(f"moe.drop_policy must be one of {list(MOE_DROP_POLICIES)}, got {moe.drop_policy!r}")
    if moe.drop_policy != MoeSection().drop_policy and moe.capacity_factor is None:
        raise ValueError(f"moe.drop_policy={moe.drop_policy!r} needs moe.capacity_factor (without one no token is "
                         "dropped); set it or remove moe.drop_policy")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _finite(config: RunConfig) -> None:
    """Every float field (at any depth, e.g. adapter.lora_alpha, optim.lr) is finite."""
    def walk(value: object, key: str) -> None:
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{key} must be a finite number, got {value}")
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                walk(getattr(value, f.name), f"{key}.{f.name}" if key else f.name)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{key}[{i}]")
    walk(config, "")


def _positive(values: dict[str, int]) -> None:
    for key, value in values.items():
        if value < 1:
            raise ValueError(f"{key} must be >= 1, got {value}")
