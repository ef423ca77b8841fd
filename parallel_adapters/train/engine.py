"""Optimizer engines: plain torch AdamW (the default) or DeepSpeed ZeRO 0-3.  The ONLY module that
imports deepspeed (lazily, so the torch engine never needs it).

Both engines give the loop the same five calls per optimizer step::

    engine.zero_grad()
    with engine.accumulate():          # one optimizer step's micro-batches
        ... engine.backward(loss) ...  # per micro-batch (or Megatron's pipeline schedule)
        engine.reduce_grads()          # inside the block, after the last backward
    stats = [loss, engine.grad_sumsq()] -> one world all-reduce (by the loop)
    engine.step(lr, grad_norm)

Why the TP sum of replicated adapter factors stays correct (docs/design.md section 4): a replicated
factor's gradient is a per-rank PARTIAL sum over tensor parallelism; it must be summed over TP
before any data-parallel reduction or norm.

* Torch engine: `AdapterModel.finalize_grads(data_parallel=True)`: one coalesced TP all-reduce of
  the replicated factors, one coalesced DP all-reduce (average) of all trainable grads.  Global
  grad-norm clipping then costs one scalar all-reduce that the loop shares with the loss report:
  each rank contributes the sum of squares of its sharded factors, of its replicated factors only
  on TP rank 0, and nothing off DP rank 0 (routed experts: expert-TP and expert-DP rank 0), so the
  world sum counts every element exactly once (over TP, PP, DP and EP; a `pipeline_replica`, the
  prefix encoder on every stage, on stage 0 only).  A stage without trainable
  tensors (prompt learning's later stages) adds 0 and steps an empty param group (lr still saved).
* DeepSpeed (ZeRO 1, 2, 3): `engine.coalesce_grad_reduction()` (in the pinned 0.19.8) keeps every
  micro-batch's gradient on the parameters and runs ZeRO's DP reduction (and, for stages 2/3, the
  partitioning) once when the block exits.  `reduce_grads()` runs `finalize_grads()` (the TP sum)
  inside the block, so DeepSpeed reduces and partitions COMPLETE gradients: the same single
  coalesced TP all-reduce per optimizer step as the torch engine; DeepSpeed's own DP reduction and
  its gradient clipping (`gradient_clipping`, whose norm counts TP-replicated factors once because
  the Megatron groups are passed as `mpu` and the sharded factors carry `tensor_model_parallel`)
  are unchanged.  ZeRO stage 0 uses `no_sync()` + `finalize_grads()` + `allreduce_gradients()`
  (correct, but its first run JIT-builds DeepSpeed's flatten op: ~3.5 min on a 2-core CPU box).
  Older DeepSpeed without `coalesce_grad_reduction` falls back to per-parameter gradient hooks on
  the tensors finalize_grads sums over TP (`register_hook`, which runs before the gradient is
  accumulated and so before any DeepSpeed hook): that costs ONE ALL-REDUCE PER REPLICATED FACTOR PER
  MICRO-BATCH (e.g. 8 for 2 layers x 4 adapted linears) instead of one per step.  `tp_sum="hooks"`
  forces it (tested with ZeRO-2 at TP=2 x DP=2, and at TP=2 + SP with a norm in modules_to_save).
  It needs one micro-batch per rank per step (each backward is a DeepSpeed step boundary there, so
  several would not add up); more are refused.
* The Megatron groups go to DeepSpeed as `mpu` through `MegatronMpu` (megatron-core dropped the
  `get_model_parallel_*` names DeepSpeed calls).  Without an mpu DeepSpeed would treat every rank
  as data parallel and SILENTLY overwrite every TP shard with rank 0's at initialisation.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
import torch.distributed as dist

from parallel_adapters.distributed import collectives as C
from parallel_adapters.distributed.groups import ParallelGroups
from parallel_adapters.train.grad_norm import grad_sumsq_contribution
from parallel_adapters.train.lr import set_lr

if TYPE_CHECKING:  # importing the adapters imports megatron: not needed to validate a config
    from parallel_adapters.adapters.model import AdapterModel


def trainable_parameters(model: AdapterModel) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class TorchEngine:
    """torch.optim.AdamW over the adapter parameters, Megatron-free DP: see the module docstring."""

    name = "torch"

    def __init__(self, model: AdapterModel, lr: float, weight_decay: float, grad_clip: float):
        self.model = model
        self.params = trainable_parameters(model)
        if C.all_ranks_agree(not self.params, model.groups.pp_group):  # one stage without any is fine
            raise ValueError("the adapter model has no trainable parameters (check adapter.target_modules)")
        self.optimizer = torch.optim.AdamW([{"params": self.params}], lr=lr, weight_decay=weight_decay)
        self.grad_clip = grad_clip
        self.computes_grad_norm = True

    @property
    def forward_module(self) -> torch.nn.Module:
        """What a PP=1 forward calls: the Megatron GPT (its LoRA layers live inside it)."""
        return self.model.model

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @contextlib.contextmanager
    def accumulate(self) -> Iterator[None]:
        yield

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def reduce_grads(self) -> None:
        self.model.finalize_grads(data_parallel=True)

    def grad_sumsq(self) -> torch.Tensor:
        return grad_sumsq_contribution(self.model)

    def step(self, lr: float, grad_norm: float | None) -> None:
        if self.grad_clip > 0 and grad_norm is not None and math.isfinite(grad_norm):
            coef = self.grad_clip / (grad_norm + 1e-6)
            if coef < 1.0:
                for param in self.params:
                    if param.grad is not None:
                        param.grad.mul_(coef)
        set_lr(self.optimizer.param_groups, lr)
        self.optimizer.step()

    @contextlib.contextmanager
    def gathered_params(self) -> Iterator[None]:
        """Full (un-ZeRO-partitioned) adapter parameters; always the case here."""
        yield

    def checkpoint_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer whose state adapter_io saves and restores (keyed by tensor names)."""
        return self.optimizer


# ----------------------------------------------------------------------------------------------
# DeepSpeed
# ----------------------------------------------------------------------------------------------

class MegatronMpu:
    """DeepSpeed's `mpu` protocol on our ParallelGroups: model parallel = tensor parallel.

    (Pipeline stages are not part of DeepSpeed's model-parallel group here: the DeepSpeed engine
    is refused with parallel.pipeline > 1, see `check_deepspeed_layout`.)"""

    def __init__(self, groups: ParallelGroups):
        self.groups = groups

    def get_model_parallel_rank(self) -> int:
        return self.groups.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.groups.tp_size

    def get_model_parallel_group(self) -> Any:
        return self.groups.tp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return dist.get_global_rank(self.groups.tp_group, 0) if self.groups.tp_size > 1 else dist.get_rank()

    def get_data_parallel_rank(self) -> int:
        return self.groups.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.groups.dp_size

    def get_data_parallel_group(self) -> Any:
        return self.groups.dp_group

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.groups.dp_group)

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.groups.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.groups.pp_size

    def get_pipeline_model_parallel_group(self) -> Any:
        return self.groups.pp_group

    get_pipe_parallel_rank = get_pipeline_model_parallel_rank
    get_pipe_parallel_world_size = get_pipeline_model_parallel_world_size
    get_pipe_parallel_group = get_pipeline_model_parallel_group


def check_deepspeed_layout(pipeline: int) -> None:
    """DeepSpeed's engine cannot drive Megatron's pipeline schedule (it owns backward)."""
    if pipeline > 1:
        raise ValueError(
            f"deepspeed: the DeepSpeed engine is not supported with parallel.pipeline={pipeline} "
            "(Megatron's pipeline schedule runs its own backward); use parallel.pipeline=1 or the "
            "torch engine (deepspeed: null)")


def load_deepspeed_json(path: str | Path) -> dict:
    """Read and check a ZeRO JSON (no process group needed); errors name the file and key."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"deepspeed: config file {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"deepspeed: {path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"deepspeed: {path} must hold a JSON object")
    for key in ("optimizer", "scheduler"):
        if key in data:
            raise ValueError(f"deepspeed: {path} has an {key!r} section; remove it: the optimizer is "
                             "torch AdamW built from optim.* and the schedule comes from optim.schedule")
    stage = data.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"deepspeed: {path}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    return data


def deepspeed_config(data: dict, micro_batch: int, dp_size: int, grad_clip: float, path: str) -> dict:
    """The JSON with the values this framework owns filled in; a conflicting value is an error.

    DeepSpeed sees ONE micro-batch of `micro_batch` x accumulation samples per step
    (gradient_accumulation_steps 1): the loop does the accumulation inside
    `coalesce_grad_reduction`, and the loss is already scaled to a mean over the global batch."""
    owned = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
             "train_batch_size": micro_batch * dp_size, "gradient_clipping": grad_clip}
    out = copy.deepcopy(data)
    for key, value in owned.items():
        have = out.get(key, "auto")
        if have != "auto" and have != value:
            raise ValueError(f"deepspeed: {path} sets {key}={have!r}, but the run config implies {value!r}; "
                             f"remove it or set it to \"auto\"")
        out[key] = value
    out["zero_allow_untested_optimizer"] = True  # the client optimizer is torch AdamW
    out.setdefault("steps_per_print", 10**9)
    out.setdefault("wall_clock_breakdown", False)
    return out


def _prepare_deepspeed_import(on_cpu: bool) -> Any:
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(tempfile.gettempdir()) / "pa_torch_extensions"))
    import deepspeed  # noqa: PLC0415  (optional dependency, only for the DeepSpeed engine)
    import deepspeed.comm.torch  # noqa: F401,PLC0415

    if on_cpu:
        # The CPU accelerator JIT-builds a shared-memory comm op (~30 s) that gloo does not need.
        # `import deepspeed.comm.torch as x` would bind the torch module, hence sys.modules.
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    import logging

    deepspeed.utils.logger.setLevel(logging.WARNING)
    return deepspeed


TP_SUM_MODES = ("auto", "coalesce", "hooks")


class DeepSpeedEngine:
    """DeepSpeed ZeRO around the adapter model with Megatron's groups as mpu; see the module doc.

    DeepSpeed's forward must run through the engine (ZeRO-3 gathers partitioned parameters in its
    forward hooks, including parameters a LoRA layer reads directly), so `forward_module` is the
    engine itself; it calls the AdapterModel, which calls the GPT."""

    name = "deepspeed"
    computes_grad_norm = False

    def __init__(self, model: AdapterModel, lr: float, weight_decay: float, ds_config: dict,
                 tp_sum: str = "auto", micro_batches: int = 1):
        if tp_sum not in TP_SUM_MODES:
            raise ValueError(f"tp_sum must be one of {TP_SUM_MODES}, got {tp_sum!r}")
        deepspeed = _prepare_deepspeed_import(on_cpu=not torch.cuda.is_available())
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
        self.model = model
        self.stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
        params = trainable_parameters(model)
        if not params:
            raise ValueError("the adapter model has no trainable parameters (check adapter.target_modules)")
        self._hooks: list[Any] = []
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config, mpu=MegatronMpu(model.groups),
            dist_init_required=False)
        coalesce = hasattr(self.engine, "coalesce_grad_reduction") and self.stage >= 1
        auto = "coalesce" if coalesce else "stage0" if self.stage == 0 else "hooks"
        self.tp_sum = auto if tp_sum == "auto" else tp_sum
        if self.tp_sum == "hooks":
            if micro_batches > 1:  # each backward is a DeepSpeed step boundary here: micro-batches would not add up
                raise ValueError(f"tp_sum='hooks' (DeepSpeed without coalesce_grad_reduction) needs one micro-batch "
                                 f"per rank per step, this run has {micro_batches}: raise optim.micro_batch or "
                                 "lower optim.global_batch")
            self._register_tp_sum_hooks()
        self._deepspeed = deepspeed

    def _register_tp_sum_hooks(self) -> None:
        """Fallback: sum each replicated factor's gradient over TP as it is produced (before
        accumulation, hence before any DeepSpeed hook): one all-reduce per factor per micro-batch.
        The same tensors as finalize_grads' TP sum: with them the sequence-parallel base tensors
        trained through modules_to_save (a router, a norm), each counted once."""
        from parallel_adapters.adapters.grad_sync import sequence_sliced_parameters  # imports megatron
        from parallel_adapters.adapters.prompt import check_hooked_tp_sum
        check_hooked_tp_sum(self.model.model)
        tp_group = self.model.groups.tp_group

        def tp_sum(grad: torch.Tensor) -> torch.Tensor:
            return C.all_reduce_(grad.clone(), tp_group)

        params = [p for _, layer in self.model.adapter_layers() for p in layer.partial_grad_parameters()]
        for param in {id(p): p for p in params + sequence_sliced_parameters(self.model.model)}.values():
            self._hooks.append(param.register_hook(tp_sum))

    @property
    def forward_module(self) -> Any:
        return self.engine

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    @contextlib.contextmanager
    def accumulate(self) -> Iterator[None]:
        if self.tp_sum == "coalesce":
            with self.engine.coalesce_grad_reduction():
                yield
        elif self.tp_sum == "stage0":
            with self.engine.no_sync():
                yield
            self.engine.allreduce_gradients()
        else:
            yield

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def reduce_grads(self) -> None:
        """The TP sum, inside `accumulate()` so that DeepSpeed's DP reduction sees full grads."""
        if self.tp_sum in ("coalesce", "stage0"):
            self.model.finalize_grads(data_parallel=False)

    def grad_sumsq(self) -> torch.Tensor:
        return torch.zeros((), dtype=torch.float64)  # DeepSpeed clips with its own global norm

    def step(self, lr: float, grad_norm: float | None) -> None:
        set_lr(self.optimizer.param_groups, lr)
        self.engine.step()

    def global_grad_norm(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    @contextlib.contextmanager
    def gathered_params(self) -> Iterator[None]:
        """ZeRO-3 partitions parameters over DP; gather the adapter factors for reading."""
        if self.stage < 3:
            yield
            return
        with self._deepspeed.zero.GatheredParameters(trainable_parameters(self.model), modifier_rank=None):
            yield

    def checkpoint_optimizer(self) -> None:
        """None: ZeRO's state is partitioned and flattened, not keyed by adapter tensor names; it is
        saved pickle-free by train/zero_state.py (`capture` / `restore`) instead."""
        return None


def deepspeed_classes() -> tuple[dict[str, type], tuple[type, ...]]:
    """For train/zero_state.py (which imports no deepspeed): the classes a ZeRO state_dict holds
    that it may rebuild (qualified name -> class), and the ZeRO optimizer classes."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler  # noqa: PLC0415
    from deepspeed.runtime.zero.config import ZeroStageEnum  # noqa: PLC0415
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3  # noqa: PLC0415
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer  # noqa: PLC0415
    from deepspeed.utils.tensor_fragment import fragment_address  # noqa: PLC0415

    known = (ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address)
    zero = (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3)
    return {f"{c.__module__}.{c.__qualname__}": c for c in known}, zero


def build_engine(model: AdapterModel, lr: float, weight_decay: float, grad_clip: float,
                 deepspeed_json: str | None, micro_batch: int, tp_sum: str = "auto",
                 micro_batches: int = 1) -> TorchEngine | DeepSpeedEngine:
    """The torch engine, or DeepSpeed from `deepspeed_json` (see `deepspeed_config`); `micro_batch`
    samples per rank per step, in `micro_batches` backward passes."""
    if deepspeed_json is None:
        return TorchEngine(model, lr, weight_decay, grad_clip)
    check_deepspeed_layout(model.groups.pp_size)
    data = load_deepspeed_json(deepspeed_json)
    config = deepspeed_config(data, micro_batch, model.groups.dp_size, grad_clip, deepspeed_json)
    return DeepSpeedEngine(model, lr, weight_decay, config, tp_sum=tp_sum, micro_batches=micro_batches)
