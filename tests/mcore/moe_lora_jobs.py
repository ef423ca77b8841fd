"""Multi-rank jobs for tests/mcore/test_moe_lora_gpt.py (module-level, plain args, run by WorkerPool).

Each DP rank's loss is the mean over its own rows; `finalize_grads(data_parallel=True)` turns
every gradient into the global mean loss's (dense adapters summed over DP, expert adapters over
expert-DP, both divided by the DP size), which the world-1 run computes directly.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist

from tests.harness import counting
from tests.mcore import moe_jobs

TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
FP64 = {"params_dtype": torch.float64}


def _adapted(tp: int, ep: int, etp: int, pp: int, sequence_parallel: bool, world_one: bool = False,
             lora_seed: int = 0, grouped: bool = False, **lora_kw):
    """This rank's MoE GPT stage (float64) with LoRA on attention and every MLP linear layer."""
    from parallel_adapters import LoraConfig, get_adapter_model
    from parallel_adapters.distributed.groups import ParallelGroups
    from parallel_adapters.mcore.gpt import build_gpt

    groups = moe_jobs._setup(tp, ep, etp, pp, 1234)
    if world_one:
        groups = ParallelGroups.single()  # every rank alone is world size 1
    if grouped:  # GroupedMLP experts, grouped_gemm's CUDA gmm replaced by a torch reference (test-only)
        from tests.mcore import grouped_gemm_shim

        grouped_gemm_shim.install()
    base = build_gpt(moe_jobs._settings(sequence_parallel, moe_grouped_gemm=grouped, **FP64))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, seed=lora_seed, **lora_kw)
    return get_adapter_model(base, config, groups=groups), groups


def consolidated_adapter(adapter, groups) -> dict[str, torch.Tensor]:
    """Global name -> full adapter tensor, gathered over the group that splits its layer (expert-TP
    for routed experts, TP otherwise) and unsharded by its ShardSpec."""
    from parallel_adapters.mcore.moe import split_group

    out = {}
    for name, t in adapter.adapter_state_dict().items():
        group, size, _ = split_group(name, groups)
        pieces = [t.local.detach().clone()]
        if not t.spec.replicated and size > 1:
            pieces = [torch.empty_like(t.local) for _ in range(size)]
            dist.all_gather(pieces, t.local.detach().contiguous(), group=group)
        out[name] = t.spec.unshard(pieces)
    return out


def _step(adapter, groups, input_ids, labels, num_microbatches: int) -> torch.Tensor | None:
    """Forward+backward of this DP rank's rows (loss: their mean); the global mean loss on the
    last stage (None elsewhere)."""
    from parallel_adapters.mcore.schedule import pipeline_forward_backward

    ids, lab = moe_jobs._dp_slice(input_ids, groups), moe_jobs._dp_slice(labels, groups)
    micro = [{"input_ids": i, "labels": t} for i, t in zip(ids.chunk(num_microbatches), lab.chunk(num_microbatches))]
    loss_fn = partial(moe_jobs._mean_loss, 1.0, adapter.model.unpadded_vocab_size)
    reports = pipeline_forward_backward(adapter.model, micro, loss_fn)
    if not groups.is_last_stage:
        return None
    loss = torch.stack([r["loss"] for r in reports]).mean()
    moe_jobs._reduce(loss, groups.dp_group, groups.dp_size)
    return loss / groups.dp_size


def train_job(tp: int, ep: int, etp: int, pp: int, input_ids: torch.Tensor, labels: torch.Tensor,
              sequence_parallel: bool = False, num_microbatches: int = 1, steps: int = 5,
              use_dora: bool = False, share: bool = False, grouped: bool = False,
              modules_to_save: list | None = None) -> dict:
    """Losses over `steps` AdamW steps and the consolidated adapter after them (all sizes 1:
    the world-1 reference on every rank); `share`: share_expert_adapters; `grouped`: GroupedMLP
    experts (the same weights as the SequentialMLP ones, see init_gpt_weights); `modules_to_save`:
    also trained, returned whole under "saved" (e.g. the routers, replicated on every rank)."""
    world_one = (tp, ep, etp, pp) == (1, 1, 1, 1) and not grouped
    adapter, groups = _adapted(tp, ep, etp, pp, sequence_parallel, world_one, use_dora=use_dora,
                               share_expert_adapters=share, grouped=grouped, modules_to_save=modules_to_save)
    optimizer = torch.optim.AdamW([p for p in adapter.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = _step(adapter, groups, input_ids, labels, num_microbatches)
        adapter.finalize_grads(data_parallel=True)
        optimizer.step()
        losses.append(None if loss is None else loss.item())
    from parallel_adapters.train.grad_norm import grad_sumsq_contribution

    sumsq = grad_sumsq_contribution(adapter)  # the last step's squared grad norm, summed over the world
    if not world_one:
        dist.all_reduce(sumsq)
    return {"losses": losses, "adapter": consolidated_adapter(adapter, groups), "grad_sumsq": sumsq.item(),
            "held": sorted(adapter.adapter_state_dict()), "ep_rank": groups.ep_rank,
            "trainable": sum(p.numel() for p in adapter.parameters() if p.requires_grad),
            "saved": {n: p.detach().clone() for n, p in adapter.model.named_parameters()
                      if any(f".{m}." in f".{n}" for m in modules_to_save or ())}}


def collectives_job(tp: int, ep: int, variant: str, input_ids: torch.Tensor, labels: torch.Tensor,
                    share: bool = False, etp: int = 1) -> dict:
    """Collectives of one forward+backward at TP=tp (SP on when tp > 1), EP=ep, expert-TP etp: the
    frozen base with the embedding trainable, or the model with expert LoRA; and, with LoRA, of
    finalize_grads without and with data-parallel averaging."""
    adapter, groups = _adapted(tp, ep, etp, 1, tp > 1, share_expert_adapters=share)
    model = adapter.model
    if variant == "frozen_base":
        model = adapter.unload()
        for p in model.parameters():
            p.requires_grad_(False)
        model.embedding.word_embeddings.weight.requires_grad_(True)
    ids, lab = moe_jobs._dp_slice(input_ids, groups), moe_jobs._dp_slice(labels, groups)
    with counting.counted() as step:
        model(ids, None, None, labels=lab).mean().backward()
    out = {"step": dict(step.calls)}
    if variant != "frozen_base":
        for data_parallel in (False, True):
            with counting.counted() as fin:
                adapter.finalize_grads(data_parallel=data_parallel)
            out[f"finalize_dp{int(data_parallel)}"] = dict(fin.calls)
    return out


def _logits(adapter) -> torch.Tensor:
    from parallel_adapters.mcore.gpt import gpt_logits

    ids = torch.arange(32).reshape(2, 16) * 7 % 256  # every rank the same rows (no DP split)
    with torch.no_grad():
        return gpt_logits(adapter.model, ids)


def checkpoint_job(directory: str, ep: int, etp: int, tp: int = 1, load_ep: int | None = None,
                   load_etp: int | None = None, **lora_kw) -> dict:
    """save_checkpoint of a MoE model with expert LoRA, then load_checkpoint (at EP=load_ep and
    expert-TP=load_etp, by default the same) into a model whose adapter was drawn from another
    seed: does every tensor this rank holds come back exactly (compared with the saving seed's
    adapter drawn at the loading layout)?  Also the logits of the saved model (at the saving
    layout) and of the loaded one (at the loading layout), on the same rows."""
    from parallel_adapters.checkpoint.adapter_io import load_checkpoint, save_checkpoint

    saved, groups = _adapted(tp, ep, etp, 1, tp > 1, **lora_kw)
    path = save_checkpoint(saved, directory)
    saved_logits = _logits(saved)
    load_ep = ep if load_ep is None else load_ep
    load_etp = etp if load_etp is None else load_etp
    if (load_ep, load_etp) != (ep, etp):  # the same adapter drawn at the loading layout (init is layout-independent)
        saved, _ = _adapted(tp, load_ep, load_etp, 1, tp > 1, **lora_kw)
    other, _ = _adapted(tp, load_ep, load_etp, 1, tp > 1, lora_seed=1, **lora_kw)
    before = other.adapter_state_dict()
    want = saved.adapter_state_dict()
    differed = all(not torch.equal(before[n].local, want[n].local) for n in want if "lora_A" in n)
    load_checkpoint(other, path, restore_rng=False)
    got = other.adapter_state_dict()
    return {"differed": differed, "names": sorted(want),
            "equal": {n: torch.equal(got[n].local, want[n].local) for n in want},
            "saved_logits": saved_logits, "loaded_logits": _logits(other)}


def dora_expert_etp_job() -> str:
    """DoRA on expert fc2 (a row layer) at expert-TP 2: the NotImplementedError message."""
    try:
        _adapted(1, 1, 2, 1, False, use_dora=True)
    except NotImplementedError as exc:
        return str(exc)
    return ""


def shared_export_job() -> dict:
    """World size 1, share_expert_adapters: are the experts' tensors one Parameter per layer and
    linear, does PEFT's per-expert layout hold the shared factors in every expert's slot, and
    does merging give the unmerged logits?"""
    from parallel_adapters.checkpoint.expert_adapter import peft_expert_tensors, unpack_expert_factors

    adapter, _ = _adapted(1, 1, 1, 1, False, True, share_expert_adapters=True)
    params = dict(adapter.model.named_parameters(remove_duplicate=False))
    tied = all(params[n] is params[n.replace("local_experts.0.", f"local_experts.{e}.")]
               for n in params if "local_experts.0." in n and "lora_" in n for e in range(4))
    full = {n: t.local for n, t in adapter.adapter_state_dict().items()}
    packed, _ = peft_expert_tensors(full, 4, 2)
    replicated = True
    for key in [k for k in packed if k.endswith("lora_A.weight")]:
        experts = unpack_expert_factors(packed[key], packed[key.replace("lora_A", "lora_B")], 4)
        replicated &= all(torch.equal(a, experts[0][0]) and torch.equal(b, experts[0][1]) for a, b in experts)
    unmerged = _logits(adapter)
    with adapter.disable_adapter():
        base = _logits(adapter)
    adapter.merge_adapter()
    return {"tied": tied, "replicated": replicated, "packed": len(packed),
            "merged_error": (_logits(adapter) - unmerged).abs().max().item(),
            "adapter_effect": (unmerged - base).abs().max().item()}
