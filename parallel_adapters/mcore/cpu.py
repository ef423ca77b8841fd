"""Run megatron-core 0.16.1 on a CPU-only torch (tests, laptops, CI), switched on explicitly.

`enable_cpu_mode()` refuses to do anything when CUDA is available, so it can never change a GPU
run; on a CPU-only box every original it replaces could only raise.  It is idempotent.

What it patches (each a small named function below, applied once):

1. `tensor_parallel.random.CudaRNGStatesTracker` -> `CpuRNGStatesTracker` (same add / fork /
   get_states / set_states API on `torch.get_rng_state`), and the live tracker instance
   (`random._CUDA_RNG_STATE_TRACKER`).  Needed by every `get_cuda_rng_tracker().fork()`
   (attention dropout, weight init on the GPU path, activation recompute).
2. `tensor_parallel.random._get_cuda_rng_state` / `_set_cuda_rng_state` -> the CPU generator
   (tracker.fork and `CheckpointFunction` of activation recompute).
3. `tensor_parallel.model_parallel_cuda_manual_seed` (both the package and the `random` module
   names) -> `model_parallel_seed`, which seeds exactly like megatron but on the CPU generator.
4. `torch.cuda.current_device` -> `torch.device("cpu")`, process-wide: megatron asks it for the
   device of GlobalMemoryBuffer (every attention forward, sequence-parallel gathers), of
   mappings' all-gather outputs, of p2p shape tensors and of DDP buffers.  On a CPU-only torch
   the original can only raise.
5. `get_default_causal_mask` / `get_sliding_window_causal_mask` in `transformer.utils` and in
   `fusions.fused_softmax` (which imported them by name) -> built on the CPU; megatron builds
   them with `device="cuda"` when `attention_mask=None`.
6. The module-level name `torch` in `pipeline_parallel.schedules` and
   `pipeline_parallel.p2p_communication` -> a proxy of torch whose tensor factories turn
   `device="cuda"` into the CPU and whose `cuda.synchronize` is a no-op (`total_num_tokens =
   torch.zeros(..., device="cuda")` in the schedules; `torch.cuda.synchronize()` after
   `batch_isend_irecv` in p2p).  torch itself is not touched.
7. `LanguageModule.setup_embeddings_and_output_layer` -> the same method with `Tensor.cuda`
   made the identity for its duration only (with tied embeddings and PP > 1 it moves the last
   stage's copy of the table with `weight.data.cuda()` before all-reducing it).
8. `transformer.moe.moe_utils.te_general_gemm` -> None when Transformer Engine is absent: the
   router's gating linear tests `te_general_gemm is not None` first, yet without TE the name is
   never bound, so every MoE forward raised NameError.  None selects its torch.mm path.  (Not
   CPU-only: build_gpt binds it for every MoE model, on a GPU too: mcore/moe.py bind_router_gemm.)
"""
from __future__ import annotations

import contextlib
import functools
import types
from typing import Any, Callable, Iterator

import torch
from megatron.core import tensor_parallel
from megatron.core.fusions import fused_softmax
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.parallel_state import (
    get_expert_model_parallel_rank,
    get_expert_tensor_parallel_rank,
    get_tensor_model_parallel_rank,
)
from megatron.core.pipeline_parallel import p2p_communication, schedules
from megatron.core.tensor_parallel import random as mp_random
from megatron.core.transformer import utils as transformer_utils

from parallel_adapters.mcore.moe import bind_router_gemm

_ENABLED = False
_CPU = torch.device("cpu")


def cpu_mode_enabled() -> bool:
    """True once `enable_cpu_mode()` has patched megatron in this process."""
    return _ENABLED


def enable_cpu_mode() -> None:
    """Patch megatron-core so that it runs on the CPU (see the module docstring for the list).

    Raises RuntimeError when CUDA is available: the patches must never touch a GPU run."""
    global _ENABLED
    if torch.cuda.is_available():
        raise RuntimeError(
            "parallel_adapters.mcore.cpu.enable_cpu_mode() refuses to run: CUDA is available, "
            "and CPU mode would redirect megatron's CUDA calls to the CPU"
        )
    if _ENABLED:
        return
    _patch_rng_tracker()
    _patch_cuda_rng_state()
    _patch_manual_seed()
    _patch_current_device()
    _patch_causal_masks()
    _patch_pipeline_factories()
    _patch_shared_embedding_setup()
    _patch_moe_router_gemm()
    _ENABLED = True


# ----------------------------------------------------------------------------------------------
# 1-3: RNG
# ----------------------------------------------------------------------------------------------

class CpuRNGStatesTracker(mp_random.CudaRNGStatesTracker):
    """megatron's RNG tracker on the CPU generator: named states that `fork()` swaps in and out."""

    def __init__(self, use_cudagraphable_rng: bool = False, is_inference_rng_tracker: bool = False):
        super().__init__(use_cudagraphable_rng=False, is_inference_rng_tracker=is_inference_rng_tracker)

    def add(self, name: str, seed: int) -> None:
        """Track a new named state seeded with `seed` (the current state is left unchanged)."""
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"cpu rng state {name} already exists")
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self, name: str = mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
        """Run the block on state `name`, then restore the previous state.  Unlike megatron's
        version there is no 'CPU RNG changed' warning: here the CPU generator is the state."""
        if name not in self.states_:
            raise Exception(f"cpu rng state {name} is not added")
        orig_state = torch.get_rng_state()
        orig_name = self._current_state_name
        if orig_name != "default-rng":
            self.states_[orig_name] = orig_state
        torch.set_rng_state(self.states_[name])
        self._current_state_name = name
        try:
            yield
        finally:
            if self._current_state_name != name:
                raise Exception(f"current state name {self._current_state_name} is not {name}")
            self.states_[name] = torch.get_rng_state()
            if orig_name != "default-rng":
                orig_state = self.states_[orig_name]
            torch.set_rng_state(orig_state)
            self._current_state_name = orig_name


def _patch_rng_tracker() -> None:
    # initialize_rng_tracker() instantiates the class by this name; get_cuda_rng_tracker() users.
    mp_random.CudaRNGStatesTracker = CpuRNGStatesTracker
    mp_random.initialize_rng_tracker(force_reset=True)


def _cpu_get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _patch_cuda_rng_state() -> None:
    # CudaRNGStatesTracker.fork, CheckpointFunction (activation recompute), _get/_set_all_rng_states.
    mp_random._get_cuda_rng_state = _cpu_get_rng_state
    mp_random._set_cuda_rng_state = _cpu_set_rng_state


def model_parallel_seed(
    seed: int,
    te_rng_tracker: bool = False,
    inference_rng_tracker: bool = False,
    use_cudagraphable_rng: bool = False,
    tp_rank: int | None = None,
    ep_rank: int | None = None,
    etp_rank: int | None = None,
    force_reset_rng: bool = False,
) -> None:
    """CPU replacement for `tensor_parallel.model_parallel_cuda_manual_seed` (same signature).

    Seeds as megatron does: the default generator and 'data-parallel-rng' with `seed`,
    'model-parallel-rng' with `seed + 2718 + tp_rank`, 'expert-parallel-rng' with
    `seed + 1024 + 100 * ep_rank + etp_rank`.  Needs the parallel state to be initialised."""
    if not _ENABLED:
        raise RuntimeError("call parallel_adapters.mcore.cpu.enable_cpu_mode() before model_parallel_seed()")
    tp_rank = get_tensor_model_parallel_rank() if tp_rank is None else tp_rank
    ep_rank = get_expert_model_parallel_rank() if ep_rank is None else ep_rank
    etp_rank = get_expert_tensor_parallel_rank() if etp_rank is None else etp_rank
    mp_random.initialize_rng_tracker(inference_rng_tracker=inference_rng_tracker, force_reset=force_reset_rng)
    tracker = mp_random.get_cuda_rng_tracker()
    tracker.reset()
    torch.manual_seed(seed)
    tracker.add(mp_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mp_random._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + etp_rank)


def _patch_manual_seed() -> None:
    # model_parallel_cuda_manual_seed seeds torch.cuda, which leaves the CPU generator unseeded.
    mp_random.model_parallel_cuda_manual_seed = model_parallel_seed
    tensor_parallel.model_parallel_cuda_manual_seed = model_parallel_seed


# ----------------------------------------------------------------------------------------------
# 4-6: devices
# ----------------------------------------------------------------------------------------------

def _cpu_current_device() -> torch.device:
    return _CPU


def _patch_current_device() -> None:
    # GlobalMemoryBuffer.get_tensor, mappings/layers SP buffers, p2p shapes, DDP buffers.
    torch.cuda.current_device = _cpu_current_device


@functools.lru_cache(maxsize=32)
def _cpu_default_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, device=_CPU), diagonal=1).bool()


def _cpu_sliding_window_causal_mask(sq: int, skv: int, window_size: Any) -> torch.Tensor:
    m = torch.ones(sq, skv, dtype=torch.bool, device=_CPU)
    mu = torch.triu(m, diagonal=skv - sq - window_size[0])
    return ~torch.tril(mu, diagonal=skv - sq + window_size[1])


def _patch_causal_masks() -> None:
    # FusedScaleMaskSoftmax.forward_torch_softmax builds the mask when attention_mask is None.
    for module in (transformer_utils, fused_softmax):
        module.get_default_causal_mask = _cpu_default_causal_mask
        module.get_sliding_window_causal_mask = _cpu_sliding_window_causal_mask


def _cpu_factory(factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(factory)
    def make(*args: Any, **kwargs: Any) -> torch.Tensor:
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs["device"] = _CPU
        return factory(*args, **kwargs)

    return make


class _CpuTorch(types.ModuleType):
    """Stands for `torch` inside one megatron module: factories on the CPU, no-op synchronize;
    everything else is torch's own attribute."""

    _FACTORIES = ("zeros", "empty", "ones", "full", "tensor", "arange")

    def __init__(self) -> None:
        super().__init__("torch")
        for name in self._FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))
        self.cuda = _CpuCuda()

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


class _CpuCuda(types.ModuleType):
    def __init__(self) -> None:
        super().__init__("torch.cuda")
        self.synchronize = lambda device=None: None

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


def _patch_pipeline_factories() -> None:
    # schedules: total_num_tokens = torch.zeros(..., device="cuda"); p2p: torch.cuda.synchronize().
    proxy = _CpuTorch()
    for module in (schedules, p2p_communication):
        module.torch = proxy


@contextlib.contextmanager
def _tensor_cuda_is_identity() -> Iterator[None]:
    own = "cuda" in torch.Tensor.__dict__
    original = torch.Tensor.__dict__.get("cuda")
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        if own:
            torch.Tensor.cuda = original
        else:
            del torch.Tensor.cuda


def _patch_shared_embedding_setup() -> None:
    # LanguageModule.setup_embeddings_and_output_layer: `weight.data = weight.data.cuda()` (tied, PP>1).
    original = LanguageModule.setup_embeddings_and_output_layer

    @functools.wraps(original)
    def setup_on_cpu(self: LanguageModule) -> None:
        with _tensor_cuda_is_identity():
            original(self)

    LanguageModule.setup_embeddings_and_output_layer = setup_on_cpu


def _patch_moe_router_gemm() -> None:
    bind_router_gemm()
