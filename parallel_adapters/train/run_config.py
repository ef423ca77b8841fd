"""RunConfig: the typed YAML that drives `parallel-adapters train`.

Loading checks every key and type against the dataclasses below and names the dotted key on
error ("optim.lr: expected a number, got 'fast'"), before any process group starts.
Overrides use the same dotted keys: `optim.lr=1e-4 parallel.tensor=4`.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from parallel_adapters.config import (EvaConfig, IA3Config, LoHaConfig, LoKrConfig, LoraConfig, PrefixTuningConfig,
                                      PromptEncoderConfig, PromptTuningConfig)
from parallel_adapters.train.prefix_run import PREFIX_KINDS, refuse_not_run_keys as refuse_prefix_keys
from parallel_adapters.train.prompt_run import PROMPT_KINDS, refuse_not_run_keys


MODEL_DTYPES = ("float32", "bfloat16")  # model.dtype: names of torch dtypes
ROUTER_DTYPES = ("fp32", "fp64")  # moe.router_dtype (or null): Megatron's names
MOE_DISPATCHERS = ("allgather", "alltoall")  # moe.dispatcher: Megatron's token dispatchers offered
MOE_DROP_POLICIES = ("probs", "position")  # moe.drop_policy: Megatron's moe_token_drop_policy


@dataclass(frozen=True)
class ModelSection:
    """A Megatron GPT built from these fields, or a Llama-family HF checkpoint imported."""

    hf_checkpoint: Optional[str] = None
    """An HF checkpoint directory: its config.json decides num_layers .. init_seed (setting them is refused)."""
    num_layers: int = 2
    hidden_size: int = 128
    ffn_hidden_size: int = 352
    num_attention_heads: int = 4
    num_query_groups: int = 2
    vocab_size: int = 257
    max_position_embeddings: int = 256
    rotary_base: float = 10000.0
    tie_embeddings: bool = False
    init_seed: int = 1234
    dtype: str = "float32"
    """The base weights' dtype: "float32" or "bfloat16" (the adapters stay float32 either way)."""
    recompute: Optional[str] = None
    """Activation recompute: null, "full" (each layer) or "selective" (attention scores)."""
    attention_dropout: Optional[float] = None
    """Megatron's attention dropout; null: the HF config's (0.0 for a model built here)."""
    hidden_dropout: float = 0.0


@dataclass(frozen=True)
class ParallelSection:
    tensor: int = 1
    pipeline: int = 1
    data: Optional[int] = None
    """None: world size / (tensor x pipeline)."""
    sequence_parallel: bool = False
    """Split activations along the sequence between TP ranks (at tensor=1 there is nothing to split)."""
    expert: int = 1
    """Expert parallelism: the routed experts of each MoE layer split over this many ranks."""
    expert_tensor: Optional[int] = None
    """Expert tensor parallelism: one expert's weights split over this many ranks; None: parallel.tensor."""


@dataclass(frozen=True)
class MoeSection:
    """Mixture-of-experts MLPs for a model built here (an HF checkpoint's config.json decides
    num_experts, topk and ffn_hidden_size; the other two are training options either way)."""

    num_experts: Optional[int] = None
    """Routed experts per layer; None: dense MLPs."""
    topk: int = 2
    """Experts each token is routed to."""
    ffn_hidden_size: Optional[int] = None
    """One expert's intermediate size; None: model.ffn_hidden_size."""
    aux_loss_coeff: float = 0.0
    """Coefficient of Megatron's load-balancing auxiliary loss (0: off)."""
    router_dtype: Optional[str] = None
    """The router's compute dtype: null (the model's), "fp32" or "fp64"."""
    dispatcher: str = "allgather"
    """Megatron's token dispatcher: "allgather" (any device) or "alltoall" (CUDA only: it creates
    CUDA streams)."""
    capacity_factor: Optional[float] = None
    """Megatron's moe_expert_capacity_factor (> 0): each expert takes at most this x its even share
    of a router's tokens x topk, dropping the rest; null drops nothing."""
    drop_policy: str = "probs"
    """Which tokens over capacity are dropped (needs capacity_factor): "probs" (lowest routing
    probability) or "position" (latest)."""
    grouped_gemm: bool = False
    """Experts as Megatron's GroupedMLP (fused weights, grouped_gemm's kernels; per-expert LoRA
    through the batched addend) instead of SequentialMLP.  Needs CUDA and the grouped_gemm
    package; a model built here only (the HF import fills SequentialMLP experts)."""


@dataclass(frozen=True)
class DataSection:
    paths: list = field(default_factory=list)
    """.txt or .jsonl ("text" field) files; empty: the corpus that ships with the package."""
    seq_len: int = 64
    tokenizer: str = "auto"
    """"byte", "hf" (from model.hf_checkpoint), or "auto" (hf when a checkpoint is given)."""


@dataclass(frozen=True)
class OptimSection:
    lr: float = 3e-3
    schedule: str = "constant"
    """"constant", "linear" or "cosine" decay after warmup."""
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 0.0
    """Max global grad norm (0 = off)."""
    micro_batch: int = 4
    global_batch: Optional[int] = None
    """None: micro_batch x data-parallel size (no gradient accumulation)."""
    steps: int = 40
    nonfinite: str = "stop"
    """A step whose loss or gradient norm is NaN/inf: "stop" the run (exit 1, nothing saved after the
    last good step) or "skip" its update (logged with the step).  DeepSpeed reports its gradient norm
    only after its update, so a non-finite DeepSpeed gradient norm always stops."""


@dataclass(frozen=True)
class CheckpointSection:
    directory: Optional[str] = None
    save_every: int = 0
    """Save every N steps (0: only at the end, if a directory is set)."""
    keep_last: int = 2
    """Checkpoints kept in directory (older ones are deleted after each save)."""


@dataclass(frozen=True)
class ExportSection:
    peft_dir: Optional[str] = None
    """Write a PEFT adapter here when training ends."""
    verify_with_peft: bool = False


@dataclass(frozen=True)
class LoggingSection:
    every: int = 1
    """Write every N-th step to metrics_jsonl (and the last one)."""
    metrics_jsonl: Optional[str] = None


ADAPTER_KINDS: dict[str, type] = {"lora": LoraConfig, "loha": LoHaConfig, "lokr": LoKrConfig, "ia3": IA3Config,
                                   **PROMPT_KINDS, **PREFIX_KINDS}
"""`adapter.kind` -> the config its other keys are (PEFT's fields for that kind; DoRA is
`kind: lora` with `use_dora: true`; prompt_tuning / p_tuning: train/prompt_run.py)."""
AdapterConfig = Union[LoraConfig, LoHaConfig, LoKrConfig, IA3Config, PromptTuningConfig, PromptEncoderConfig,
                      PrefixTuningConfig]


def adapter_kind_name(adapter: Any) -> str:
    """The `adapter.kind` of an adapter config."""
    return next(k for k, cls in ADAPTER_KINDS.items() if type(adapter) is cls)


@dataclass(frozen=True)
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    moe: MoeSection = field(default_factory=MoeSection)
    adapter: AdapterConfig = field(default_factory=LoraConfig)
    """`kind: lora | loha | lokr | ia3 | prompt_tuning | p_tuning` (default lora), then that kind's PEFT fields."""
    eva: Optional[EvaConfig] = None
    """EVA's settings; a section here turns EVA on whatever adapter.init_lora_weights says (an
    adapter.eva_config that differs is refused).  null: EVA only with adapter.init_lora_weights=eva,
    with adapter.eva_config or EvaConfig()'s defaults.  A resumed run does not rerun EVA."""
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    deepspeed: Optional[str] = None
    """Path to a DeepSpeed ZeRO JSON, or None for plain torch AdamW."""
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    export: ExportSection = field(default_factory=ExportSection)
    seed: int = 0
    logging: LoggingSection = field(default_factory=LoggingSection)


def load_run_config(path: str | Path | None, overrides: list[str] | tuple = ()) -> RunConfig:
    """Read YAML (or start from defaults with path=None), apply `key=value` overrides, validate."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist")
        data = _read_yaml(path) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the top level must be a mapping of sections")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like section.key=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ValueError(f"override {item!r}: the value is not valid YAML ({_one_line(exc)})") from None
        _set_dotted(data, key.split("."), value)
    return build(RunConfig, data, "")


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def _read_yaml(path: Path) -> Any:
    """yaml.safe_load of a file; ValueError naming the file (and the line) on bad YAML or bytes."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start}): is this the run config?") from None
    except yaml.YAMLError as exc:  # includes python/object tags, which safe_load refuses
        raise ValueError(f"{path}: not a valid YAML run config: {_one_line(exc)}") from None


def _set_dotted(data: dict, keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        child = data.setdefault(key, {})
        if child is None:
            child = data[key] = {}
        if not isinstance(child, dict):
            raise ValueError(f"override {'.'.join(keys)}: {key!r} is not a section")
        data = child
    data[keys[-1]] = value


def build(cls: type, data: Any, path: str) -> Any:
    """Construct dataclass `cls` from a mapping, checking keys and types; errors name the key."""
    if not isinstance(data, dict):
        raise ValueError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        where = f"{path}." if path else ""
        raise ValueError(f"unknown config key(s) {[where + k for k in unknown]}; allowed: {sorted(fields)}")
    values = {k: _coerce(hints[k], v, f"{path}.{k}" if path else k) for k, v in data.items()}
    try:
        return cls(**values)
    except ValueError as exc:
        raise ValueError(f"{path or 'config'}: {exc}") from None


def _build_adapter(data: Any, path: str) -> Any:
    """The adapter section: `kind` picks the config; a key that kind does not have is refused."""
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping, got {type(data).__name__}")
    data = dict(data)
    kind = data.pop("kind", "lora")
    if kind not in ADAPTER_KINDS:
        raise ValueError(f"{path}.kind: {kind!r} is not an adapter kind; one of {sorted(ADAPTER_KINDS)}")
    cls = ADAPTER_KINDS[kind]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"{path}: {[f'{path}.{k}' for k in unknown]} are not fields of adapter kind {kind!r} "
                         f"({cls.__name__}); allowed: {sorted(fields | {'kind'})}")
    refuse_not_run_keys(kind, data, path)
    conv_only = [k for k, default in _CONV_ONLY.items() if k in data and data[k] != default]
    if conv_only:
        raise ValueError(f"{path}.{conv_only[0]} shapes adapters on nn.Conv2d, and a run's Megatron GPT has none; "
                         f"remove {path}.{conv_only[0]}")
    refuse_prefix_keys(kind, data, path)
    for key, init in _INIT_SETTINGS.items():  # PEFT ignores them under another init: a run refuses instead
        if key in data and data.get("init_lora_weights") != init:
            raise ValueError(f"{path}.{key} configures init_lora_weights={init!r}, but {path}.init_lora_weights is "
                             f"{data.get('init_lora_weights', True)!r}: set it to {init!r} or remove {path}.{key}")
    return build(cls, data, path)


_INIT_SETTINGS = {"corda_config": "corda", "loftq_config": "loftq"}
"""LoraConfig fields that only one init_lora_weights reads."""


_CONV_ONLY = {"conv_layout": "peft", "use_effective_conv2d": False}
"""Adapter fields that only shape adapters on nn.Conv2d (LoraConfig, LoHaConfig, LoKrConfig)."""


def _coerce(hint: Any, value: Any, path: str) -> Any:
    if hint == AdapterConfig:
        return _build_adapter(value, path)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, path)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0] if len(errors) == 1 else f"{path}: {value!r} matches none of {args}")
    if dataclasses.is_dataclass(hint):
        return build(hint, value, path)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{path}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{path}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-2 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{path}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{path}: expected a string, got {value!r}")
    if hint in (list, tuple) or origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            return list(value)
        raise ValueError(f"{path}: expected a list, got {value!r}")
    if hint is dict or origin is dict:
        if isinstance(value, dict):
            return value
        raise ValueError(f"{path}: expected a mapping, got {value!r}")
    return value  # Any / free-form
