"""Pickle-free DeepSpeed resume (docs/design.md section 6: checkpoints are only safetensors + JSON).

DeepSpeed's own `save_checkpoint` / `load_checkpoint` use torch.save / torch.load (pickle).  Instead
this rank's `engine.optimizer.state_dict()` is flattened by `flatten_state` into
"deepspeed/optimizer/<path>" -> tensor or JSON scalar, plus "deepspeed/optimizer/__layout__" (a
JSON string that rebuilds the containers and the few DeepSpeed objects in them), and stored as the
checkpoint's per-(tp, pp, dp)-rank optimizer state (`save_sharded(optimizer_state=...)`).  Resume
rebuilds the nested dict and hands it to the optimizer's own `load_state_dict`, as DeepSpeed's
loader would (between `checkpoint_event_prologue/epilogue`), with only this rank's entry in the
per-DP-rank list: rigid ZeRO checkpoints read only their own (elastic ZeRO-1/2 checkpoints, which
read every rank's, are refused).  DeepSpeed 0.19.8, fp32, per stage:

* ZeRO 1/2 (`DeepSpeedZeroOptimizer`): loss_scaler (a `LossScaler` object), dynamic_loss_scale,
  overflow, clip_grad, base_optimizer_state (torch AdamW's state_dict over the flat fp32
  partition: state {0: step, exp_avg, exp_avg_sq}, param_groups with a `betas` tuple),
  single_partition_of_fp32_groups (the unpadded fp32 partitions, restored exactly:
  load_from_fp32_weights=True), zero_stage (`ZeroStageEnum`), group_paddings,
  param_alignment_paddings, partition_count, ds_version, param_slice_mappings (OrderedDict
  name -> `fragment_address(numel, start)`).
* ZeRO 3 (`DeepSpeedZeroOptimizer_Stage3`): zero_stage, loss_scaler, dynamic_loss_scale,
  overflow, partition_count, optimizer_state_dict (torch AdamW over the fp32 flat partition),
  fp32_flat_groups.
* ZeRO 0 with fp32: the client torch optimizer itself, its plain state_dict.

Plus the engine counters DeepSpeed's loader restores ("deepspeed/engine/global_steps", ...).  The
LR needs nothing (optim.schedule is a function of the step; a DeepSpeed scheduler is refused).
Objects are rebuilt as pickle would (no constructor call), but only for the classes the engine
names (`train.engine.deepspeed_classes`: this module imports no deepspeed); anything else in a state
is refused when saving, naming its path.
"""
from __future__ import annotations

import collections
import enum
import importlib.metadata
import json
import math
from typing import Any, Mapping

import torch

from parallel_adapters.distributed import collectives as C

STATE_PREFIX = "deepspeed/"
OPTIMIZER_PREFIX = "deepspeed/optimizer/"
ENGINE_PREFIX = "deepspeed/engine/"
ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps", "micro_steps")
LAYOUT_KEY = "__layout__"
_SCALARS = (bool, int, float, str, type(None))
Classes = Mapping[str, type]
"""Qualified class name -> class: the enums and plain-attribute objects a state may hold."""


# ----------------------------------------------------------------------------------------------
# A DeepSpeedEngine's state (train/loop.py saves it, train/runner.py restores it)
# ----------------------------------------------------------------------------------------------

def check_checkpointing(engine: Any) -> None:
    """Raise ValueError if this DeepSpeedEngine cannot be checkpointed pickle-free (the runner
    calls it before training when checkpoints are written or read, not at the first save)."""
    opt, ds = engine.optimizer, engine.engine
    if optimizer_kind(engine) is None:
        raise ValueError(
            "deepspeed: checkpoints support ZeRO 1/2 (DeepSpeedZeroOptimizer), ZeRO 3 "
            "(DeepSpeedZeroOptimizer_Stage3) and ZeRO 0 with the plain torch optimizer; this configuration "
            f"uses {qualname(type(opt))} (e.g. an fp16/bf16 wrapper), whose state cannot be saved without "
            "DeepSpeed's pickled checkpoint files")
    if getattr(opt, "elastic_checkpoint", False):
        raise ValueError("deepspeed: zero_optimization.elastic_checkpoint=true is not supported by checkpoints "
                         "(its loader reads every DP rank's state); remove it")
    if ds.zero_nvme_offload_optimizer() or getattr(opt, "swap_optimizer", False):
        raise ValueError("deepspeed: NVMe optimizer offload keeps optimizer state in swap files that checkpoints "
                         "cannot hold; use offload_optimizer.device \"cpu\" or \"none\"")
    if ds.lr_scheduler is not None:
        raise ValueError("deepspeed: a DeepSpeed LR scheduler is not supported (optim.schedule sets the LR)")


def optimizer_kind(engine: Any) -> str | None:
    """"zero" (the ZeRO 1/2/3 optimizers), "torch" (ZeRO 0: the client torch optimizer) or None."""
    from parallel_adapters.train.engine import deepspeed_classes

    if isinstance(engine.optimizer, deepspeed_classes()[1]):
        return "zero"
    return "torch" if engine.stage == 0 and isinstance(engine.optimizer, torch.optim.Optimizer) else None


def capture(engine: Any) -> dict[str, Any]:
    """This rank's optimizer state + engine counters, flat (tensors are copies).  Every rank."""
    from parallel_adapters.train.engine import deepspeed_classes

    check_checkpointing(engine)
    opt, hooks = engine.optimizer, optimizer_kind(engine) == "zero"
    if hooks and hasattr(opt, "checkpoint_event_prologue"):
        opt.checkpoint_event_prologue()  # as DeepSpeed's save_checkpoint does
    try:
        flat = flatten_state(opt.state_dict(), OPTIMIZER_PREFIX, deepspeed_classes()[0])
    finally:
        if hooks and hasattr(opt, "checkpoint_event_epilogue"):
            opt.checkpoint_event_epilogue()
    flat.update({ENGINE_PREFIX + key: int(getattr(engine.engine, key)) for key in ENGINE_COUNTERS})
    flat.update({STATE_PREFIX + "optimizer_class": type(opt).__name__, STATE_PREFIX + "zero_stage": engine.stage,
                 STATE_PREFIX + "version": importlib.metadata.version("deepspeed")})
    return flat


def restore(engine: Any, flat: Mapping[str, Any], source: str) -> None:
    """Inverse of `capture` into a freshly built DeepSpeedEngine whose model already holds the
    checkpoint's adapter weights (loaded before deepspeed.initialize).  Every rank."""
    from parallel_adapters.train.engine import deepspeed_classes

    check_checkpointing(engine)
    opt, classes = engine.optimizer, deepspeed_classes()[0]
    saved_class, saved_stage = flat.get(STATE_PREFIX + "optimizer_class"), flat.get(STATE_PREFIX + "zero_stage")
    if saved_class is None:
        raise ValueError(f"resume: {source} holds no DeepSpeed optimizer state (written by the torch engine, or "
                         "by an older version that kept it in DeepSpeed's pickled engine_state/ files, which are "
                         "no longer read)")
    if (saved_class, saved_stage) != (type(opt).__name__, engine.stage):
        raise ValueError(f"resume: {source} was saved with ZeRO stage {saved_stage} ({saved_class}); this run "
                         f"uses ZeRO stage {engine.stage} ({type(opt).__name__})")
    counters = {key: flat.get(ENGINE_PREFIX + key) for key in ENGINE_COUNTERS}
    bad = [k for k, v in counters.items() if type(v) is not int]
    if bad:
        raise ValueError(f"resume: {source}: DeepSpeed counters {bad} are missing or not integers")
    state = unflatten_state(flat, OPTIMIZER_PREFIX, classes)
    check_covers(state, opt.state_dict(), classes, source)
    if optimizer_kind(engine) == "torch":
        opt.load_state_dict(state)
    else:  # ZeRO's load takes one state per DP rank and (rigid checkpoints) reads only its own
        per_rank: list[Any] = [None] * C.group_size(opt.dp_process_group)
        per_rank[C.group_rank(opt.dp_process_group)] = state
        if hasattr(opt, "checkpoint_event_prologue"):
            opt.checkpoint_event_prologue()
        opt.load_state_dict(per_rank, load_optimizer_states=True, load_from_fp32_weights=True)
        if hasattr(opt, "checkpoint_event_epilogue"):
            opt.checkpoint_event_epilogue()
    for key, value in counters.items():
        setattr(engine.engine, key, value)


def check_covers(saved: Any, live: Any, classes: Classes, source: str) -> None:
    """Every tensor the live optimizer already holds must be saved with the same shape and dtype
    (AdamW's moments appear only after the first step, so extra saved entries are fine)."""
    live_flat, saved_flat = flatten_state(live, "", classes), flatten_state(saved, "", classes)
    problems = []
    for key, value in live_flat.items():
        other = saved_flat.get(key)
        if not isinstance(value, torch.Tensor):
            continue
        if not isinstance(other, torch.Tensor):
            problems.append(f"{key!r} is missing")
        elif (other.shape, other.dtype) != (value.shape, value.dtype):
            problems.append(f"{key!r} is {other.dtype} {tuple(other.shape)}, this run has "
                            f"{value.dtype} {tuple(value.shape)}")
    if problems:
        raise ValueError(f"resume: the DeepSpeed optimizer state in {source} does not match this run's: "
                         + "; ".join(problems[:5]) + (f" and {len(problems) - 5} more" if len(problems) > 5 else ""))


# ----------------------------------------------------------------------------------------------
# Nested state <-> {path: tensor or JSON scalar} + JSON layout
# ----------------------------------------------------------------------------------------------

def qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _component(key: Any) -> str:
    return str(key).replace("%", "%25").replace("/", "%2F")


def flatten_state(state: Any, prefix: str, classes: Classes = {}) -> dict[str, Any]:  # noqa: B006 (read only)
    """`state` (nested dict/OrderedDict/list/tuple of tensors, JSON scalars, torch dtypes, and enums
    or plain-attribute objects of `classes`) -> {prefix + "path/to/leaf": tensor copy or JSON
    scalar} + {prefix + LAYOUT_KEY: JSON string of the containers}.  Dict keys may be str or int
    (JSON keeps them apart in the layout).  Anything else raises ValueError naming its path."""
    flat: dict[str, Any] = {}

    def put(path: tuple[str, ...], value: Any) -> None:
        key = prefix + "/".join(path)
        if key in flat or key == prefix + LAYOUT_KEY:
            raise ValueError(f"optimizer state: two entries map to the flat key {key!r}")
        flat[key] = value

    def walk(x: Any, path: tuple[str, ...]) -> Any:
        where, name = prefix + "/".join(path), qualname(type(x))
        if isinstance(x, torch.Tensor):
            put(path, x.detach().clone())
            return "tensor"
        if isinstance(x, enum.Enum):
            if classes.get(name) is not type(x) or type(x.value) not in _SCALARS:
                raise ValueError(f"optimizer state {where!r}: enum {name} cannot be stored without pickle")
            return {"enum": name, "value": x.value}
        if type(x) is float and not math.isfinite(x):
            return {"float": repr(x)}  # strict JSON has no inf/nan
        if type(x) in _SCALARS:
            put(path, x)
            return "scalar"
        if isinstance(x, torch.dtype):
            return {"dtype": str(x).removeprefix("torch.")}
        if type(x) in (dict, collections.OrderedDict):
            items, seen = [], set()
            for key, value in x.items():
                if type(key) not in (str, int):
                    raise ValueError(f"optimizer state {where!r}: dict key {key!r} is neither str nor int")
                if _component(key) in seen:
                    raise ValueError(f"optimizer state {where!r}: keys like {key!r} are ambiguous")
                seen.add(_component(key))
                items.append([key, walk(value, path + (_component(key),))])
            return {"dict": items, "ordered": type(x) is collections.OrderedDict}
        if type(x) in (list, tuple):
            return {type(x).__name__: [walk(v, path + (str(i),)) for i, v in enumerate(x)]}
        if classes.get(name) is type(x) and hasattr(x, "__dict__"):
            return {"object": name, "attrs": walk(dict(vars(x)), path)}
        raise ValueError(f"optimizer state {where!r}: a {name} cannot be stored as safetensors/JSON (not a "
                         "tensor, JSON scalar, dict/list/tuple, torch dtype or one of the known classes "
                         f"{sorted(classes)}); refusing to pickle it")

    layout = walk(state, ())
    flat[prefix + LAYOUT_KEY] = json.dumps(layout, allow_nan=False, separators=(",", ":"))
    return flat


def unflatten_state(flat: Mapping[str, Any], prefix: str, classes: Classes = {}) -> Any:  # noqa: B006
    """Inverse of `flatten_state` from the `prefix` entries of `flat` (other keys are ignored).
    ValueError when an entry is missing, left over or of the wrong kind, or the layout names a
    class outside `classes`."""
    text = flat.get(prefix + LAYOUT_KEY)
    try:
        layout = json.loads(text) if isinstance(text, str) else None
    except json.JSONDecodeError:
        layout = None
    if layout is None:
        raise ValueError(f"optimizer state: {prefix + LAYOUT_KEY!r} is missing or not JSON")
    used: set[str] = set()

    def leaf(path: tuple[str, ...], want_tensor: bool) -> Any:
        key = prefix + "/".join(path)
        if key not in flat:
            raise ValueError(f"optimizer state: {key!r} is missing")
        if isinstance(flat[key], torch.Tensor) != want_tensor:
            raise ValueError(f"optimizer state: {key!r} should be a {'tensor' if want_tensor else 'JSON scalar'}")
        used.add(key)
        return flat[key]

    def known(name: Any, kind: type) -> type:
        cls = classes.get(name) if isinstance(name, str) else None
        if cls is None or issubclass(cls, enum.Enum) != (kind is enum.Enum):
            raise ValueError(f"optimizer state: {name!r} is not a class this loader rebuilds")
        return cls

    def build(node: Any, path: tuple[str, ...]) -> Any:
        if node in ("tensor", "scalar"):
            return leaf(path, node == "tensor")
        kind = next(iter(node), None) if isinstance(node, dict) else None
        if kind == "dict":
            items = [(key, build(child, path + (_component(key),))) for key, child in node["dict"]]
            return collections.OrderedDict(items) if node.get("ordered") else dict(items)
        if kind in ("list", "tuple"):
            items = [build(child, path + (str(i),)) for i, child in enumerate(node[kind])]
            return items if kind == "list" else tuple(items)
        if kind == "float" and node["float"] in ("inf", "-inf", "nan"):
            return float(node["float"])
        if kind == "dtype" and isinstance(getattr(torch, str(node["dtype"]), None), torch.dtype):
            return getattr(torch, node["dtype"])
        if kind == "enum":
            return known(node["enum"], enum.Enum)(node["value"])
        if kind == "object":
            obj = object.__new__(known(node["object"], object))
            obj.__dict__.update(build(node["attrs"], path))
            return obj
        raise ValueError(f"optimizer state: bad layout entry at {prefix + '/'.join(path)!r}: {node!r}")

    state = build(layout, ())
    left = sorted(k for k in flat if k.startswith(prefix) and k != prefix + LAYOUT_KEY and k not in used)
    if left:
        raise ValueError(f"optimizer state: entries the layout does not name: {left[:5]}"
                         + (f" and {len(left) - 5} more" if len(left) > 5 else ""))
    return state
