"""Multi-rank jobs for tests/mcore/test_gpt.py (module-level, plain args, run by WorkerPool).

Every job: enable CPU mode, initialise Megatron's parallel state, seed with
`cpu.model_parallel_seed`, then build.  Results come back as plain tensors / dicts.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F

SEED = 1234


def _setup(tp: int, pp: int, seed: int = SEED):
    from parallel_adapters.mcore import compat, cpu

    cpu.enable_cpu_mode()
    groups = compat.initialize_model_parallel(tp, pp)
    cpu.model_parallel_seed(seed)
    return groups


def full_weights(model, groups) -> dict[str, torch.Tensor]:
    """Global name -> full tensor, all-gathered over TP and unsharded by each parameter's spec."""
    from parallel_adapters.mcore.gpt import global_parameter_names, param_shard_spec

    names = global_parameter_names(model)
    out = {}
    for local, param in model.named_parameters():
        spec = param_shard_spec(param)
        shards = [param.detach().clone()]
        if not spec.replicated and groups.tp_size > 1:
            shards = [torch.empty_like(param) for _ in range(groups.tp_size)]
            dist.all_gather(shards, param.detach().contiguous(), group=groups.tp_group)
        out[names[local]] = spec.unshard(shards)
    return out


def logits_job(tp: int, sequence_parallel: bool, input_ids: torch.Tensor, **settings_kw) -> dict:
    """gpt_logits and the consolidated full weights of a TP=tp (DP = world/tp) model."""
    from parallel_adapters.mcore.gpt import GPTSettings, build_gpt, gpt_logits

    settings = GPTSettings(sequence_parallel=sequence_parallel, **settings_kw)
    groups = _setup(tp, 1, settings.seed)
    model = build_gpt(settings)
    model.eval()
    with torch.no_grad():
        logits = gpt_logits(model, input_ids)
    return {
        "logits": logits,
        "weights": full_weights(model, groups),
        "vocab_rows": model.embedding.word_embeddings.weight.shape[0] * groups.tp_size,
        "sp_norm": getattr(model.decoder.final_layernorm.weight, "sequence_parallel", None),
    }


def half_precision_job(dtype: torch.dtype, input_ids: torch.Tensor) -> dict:
    """A TP=1 GPT in `dtype`: megatron's half-precision flags, and its logits next to fp32's."""
    from parallel_adapters.mcore.gpt import GPTSettings, build_gpt, gpt_logits

    _setup(1, 1)
    out = {}
    for name, params_dtype in (("half", dtype), ("fp32", torch.float32)):
        model = build_gpt(GPTSettings(params_dtype=params_dtype))
        model.eval()
        with torch.no_grad():
            out[name] = gpt_logits(model, input_ids).float()
        if name == "half":
            softmax = model.decoder.layers[0].self_attention.core_attention.scale_mask_softmax
            out["flags"] = (model.config.fp16, model.config.bf16, softmax.input_in_float16, softmax.softmax_in_fp32)
    return out


def recompute_calls_job(recompute: str | None, input_ids: torch.Tensor) -> int:
    """How many activation checkpoints one training forward of a 2-layer GPT opens."""
    from megatron.core import tensor_parallel

    from parallel_adapters.mcore.gpt import GPTSettings, build_gpt, gpt_logits

    _setup(1, 1)
    model = build_gpt(GPTSettings(recompute=recompute))
    model.embedding.word_embeddings.weight.requires_grad_(True)
    real, calls = tensor_parallel.checkpoint, [0]

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    tensor_parallel.checkpoint = counting
    try:
        gpt_logits(model, input_ids).sum().backward()
    finally:
        tensor_parallel.checkpoint = real
    return calls[0]


def _lm_step(data_iterator, model):
    ids, labels = next(data_iterator)
    return model(ids, None, None, labels=labels), partial(_mean_loss)


def _mean_loss(per_token_loss: torch.Tensor):
    loss = per_token_loss.float().mean()
    return loss, {"loss": loss.detach().clone()}  # megatron divides the first in place


def pipeline_job(pp: int, input_ids: torch.Tensor, labels: torch.Tensor, forward_only: bool,
                 num_microbatches: int = 2) -> dict:
    """Mean LM loss over microbatches through get_forward_backward_func (PP=pp, TP=1), and, with
    backward, every parameter's gradient under its global name (this stage's parameters)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from parallel_adapters.mcore.gpt import GPTSettings, build_gpt, global_parameter_names

    settings = GPTSettings()
    groups = _setup(1, pp, settings.seed)
    model = build_gpt(settings)
    micro = list(zip(input_ids.chunk(num_microbatches), labels.chunk(num_microbatches)))
    losses = get_forward_backward_func()(
        forward_step_func=_lm_step,
        data_iterator=iter(micro),
        model=[model],
        num_microbatches=num_microbatches,
        seq_length=input_ids.shape[1],
        micro_batch_size=input_ids.shape[0] // num_microbatches,
        forward_only=forward_only,
    )
    names = global_parameter_names(model)
    grads = {} if forward_only else {names[n]: p.grad.clone() for n, p in model.named_parameters()}
    loss = torch.stack([d["loss"] for d in losses]).mean() if groups.is_last_stage else None
    return {"loss": loss, "grads": grads, "stage": groups.pp_rank}


def pipeline_logits_job(pp: int, input_ids: torch.Tensor, **settings_kw) -> torch.Tensor | None:
    """gpt_logits through the forward-only schedule (last stage) at PP=pp."""
    from parallel_adapters.mcore.gpt import GPTSettings, build_gpt, gpt_logits

    settings = GPTSettings(**settings_kw)
    _setup(1, pp, settings.seed)
    model = build_gpt(settings)
    with torch.no_grad():
        return gpt_logits(model, input_ids)


def build_without_state_job() -> str:
    """build_gpt before initialize_model_parallel: the ValueError message (or '' if none)."""
    from parallel_adapters.mcore import compat, cpu
    from parallel_adapters.mcore.gpt import GPTSettings, build_gpt

    cpu.enable_cpu_mode()
    compat.destroy_model_parallel()
    try:
        build_gpt(GPTSettings())
    except ValueError as exc:
        return str(exc)
    return ""


def cpu_mode_job(seed: int = 7) -> dict:
    """enable_cpu_mode twice patches once; model_parallel_seed seeds as megatron does; activation
    recompute (tensor_parallel.checkpoint) replays the same dropout mask on the CPU generator."""
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mp_random

    from parallel_adapters.mcore import cpu

    cpu.enable_cpu_mode()
    patched = (torch.cuda.current_device, schedules.torch, mp_random._get_cuda_rng_state,
               mp_random.CudaRNGStatesTracker, tensor_parallel.model_parallel_cuda_manual_seed)
    cpu.enable_cpu_mode()
    again = (torch.cuda.current_device, schedules.torch, mp_random._get_cuda_rng_state,
             mp_random.CudaRNGStatesTracker, tensor_parallel.model_parallel_cuda_manual_seed)
    groups = _setup(2, 1, seed)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    with tracker.fork():
        tp_draw = torch.rand(4)
    default_draw = torch.rand(4)
    with tracker.fork(mp_random._DATA_PARALLEL_RNG_TRACKER_NAME):
        dp_draw = torch.rand(4)
    expected = {
        "tp": torch.rand(4, generator=torch.Generator().manual_seed(seed + 2718 + groups.tp_rank)),
        "default": torch.rand(4, generator=torch.Generator().manual_seed(seed)),
        "dp": torch.rand(4, generator=torch.Generator().manual_seed(seed)),
    }
    return {
        "enabled": cpu.cpu_mode_enabled(),
        "idempotent": all(a is b for a, b in zip(patched, again)),
        "current_device": str(torch.cuda.current_device()),
        "tracker_cls": type(tracker).__name__,
        "draws": {"tp": tp_draw, "default": default_draw, "dp": dp_draw},
        "expected": expected,
        "recompute_grad_err": _recompute_grad_error(tracker),
    }


def _dropout_block(x: torch.Tensor) -> torch.Tensor:
    from megatron.core import tensor_parallel

    with tensor_parallel.get_cuda_rng_tracker().fork():
        return F.dropout(x, p=0.5, training=True) * x


def _recompute_grad_error(tracker) -> float:
    from megatron.core import tensor_parallel

    x = torch.randn(8, 8, dtype=torch.float64)
    states = {k: v.clone() for k, v in tracker.get_states().items()}
    x1 = x.clone().requires_grad_()
    tensor_parallel.checkpoint(_dropout_block, False, x1).sum().backward()
    tracker.set_states({k: v.clone() for k, v in states.items()})
    x2 = x.clone().requires_grad_()
    _dropout_block(x2).sum().backward()
    return float((x1.grad - x2.grad).abs().max())
