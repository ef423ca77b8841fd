"""Multi-rank jobs for the prefix-tuning tests (run by WorkerPool): a tiny HF Llama imported into
Megatron at the given TP / PP / SP with a prefix adapter set to given values (PEFT's table, or
PEFT's encoder tensors), then logits, loss and gradients, training steps or collective counts."""
from __future__ import annotations

import torch

from tests.harness import counting
from tests.mcore.prompt_jobs import _prompted, pretrained_round_trip

N_PREFIX = 5


def _prefixed(hf_dir: str, tp: int, pp: int, sp: bool, fields: dict, state: dict | None):
    from parallel_adapters import PrefixTuningConfig

    adapter, groups, settings = _prompted(hf_dir, tp, pp, sp,
                                          config=PrefixTuningConfig(num_virtual_tokens=N_PREFIX, **fields))
    prefix = adapter.model.prefix_tuning
    if state is not None:
        with torch.no_grad():
            if "default" in prefix.encoders:
                prefix.encoders["default"].load_state_dict(state)
            for layer, table in (prefix.tables["default"].items() if "default" in prefix.tables else []):
                full = state["prompt_embeddings"]
                table.copy_(full[:, prefix.columns[int(layer)]].view(full.shape[0], 2, -1))
    return adapter, groups, settings


def _grads(adapter) -> dict:
    return {k: p.grad.clone() for k, p in adapter.model.prefix_tuning.params("default").items()}


def parity_job(hf_dir: str, tp: int, pp: int, sp: bool, ids: torch.Tensor, labels: torch.Tensor, fields: dict,
               state: dict) -> dict:
    """Logits (last stage), transformers' loss, this rank's finalized prefix (or encoder) gradients."""
    from parallel_adapters.adapters.prompt import causal_lm_loss
    from parallel_adapters.mcore.gpt import gpt_logits
    from parallel_adapters.mcore.schedule import pipeline_forward_backward

    adapter, groups, settings = _prefixed(hf_dir, tp, pp, sp, fields, state)
    if pp == 1:
        logits = gpt_logits(adapter.model, ids)
        loss = causal_lm_loss(logits, labels, 0)
        loss.backward()
        logits, loss = logits.detach(), loss.detach()
    else:
        with torch.no_grad():
            logits = gpt_logits(adapter.model, ids)

        def loss_fn(batch, output):
            value = causal_lm_loss(output[..., :settings.vocab_size], batch["labels"], 0)
            return value, {"loss": value.detach().clone()}
        reports = pipeline_forward_backward(adapter.model, [{"input_ids": ids, "labels": labels}], loss_fn)
        loss = reports[0]["loss"] if reports else None
    adapter.finalize_grads()
    prefix = adapter.model.prefix_tuning
    return {"logits": logits, "loss": loss, "grads": _grads(adapter), "tp_rank": groups.tp_rank,
            "columns": {str(k): v for k, v in prefix.columns.items()}, "state": sorted(adapter.adapter_state_dict()),
            "trainable": sorted(n for n, p in adapter.named_parameters() if p.requires_grad)}


def training_job(hf_dir: str, tp: int, sp: bool, ids: torch.Tensor, labels: torch.Tensor, fields: dict,
                 steps: int = 5) -> dict:
    """`steps` AdamW steps on the prefix alone (seeded init): losses and this rank's final tensors."""
    from parallel_adapters.adapters.prompt import causal_lm_loss
    from parallel_adapters.mcore.gpt import gpt_logits

    adapter, groups, _ = _prefixed(hf_dir, tp, 1, sp, {"seed": 3, **fields}, None)
    params = [p for p in adapter.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = causal_lm_loss(gpt_logits(adapter.model, ids), labels, 0)
        loss.backward()
        adapter.finalize_grads()
        optimizer.step()
        losses.append(loss.item())
    tensors = {k: p.detach().clone() for k, p in adapter.model.prefix_tuning.params("default").items()}
    return {"losses": losses, "tensors": tensors, "tp_rank": groups.tp_rank}


def collectives_job(hf_dir: str, sp: bool, variant: str, ids: torch.Tensor, labels: torch.Tensor, fields: dict):
    """Collectives of one forward+backward at TP=2 (the frozen base with only the word embedding
    trainable, or the prefix adapter) and of finalize_grads."""
    from parallel_adapters.adapters.prompt import causal_lm_loss
    from parallel_adapters.mcore.gpt import gpt_logits

    adapter, _, _ = _prefixed(hf_dir, 2, 1, sp, {"seed": 1, **fields}, None)
    if variant == "frozen_base":
        adapter.disable_adapter_layers()
        adapter.model.embedding.word_embeddings.weight.requires_grad_(True)
    with counting.counted() as step:
        causal_lm_loss(gpt_logits(adapter.model, ids), labels, 0).backward()
    with counting.counted() as fin:
        adapter.finalize_grads()
    return dict(step.calls), dict(fin.calls)


def save_job(hf_dir: str, tp: int, pp: int, sp: bool, ckpt_dir: str, ids: torch.Tensor, fields: dict,
             state: dict) -> dict:
    """Logits of the prefixed model set to `state`, save_checkpoint; then the prefix zeroed and
    load_checkpoint bringing it back (the logits again)."""
    from parallel_adapters.checkpoint.adapter_io import load_checkpoint, save_checkpoint
    from parallel_adapters.mcore.gpt import gpt_logits

    adapter, _, _ = _prefixed(hf_dir, tp, pp, sp, fields, state)
    with torch.no_grad():
        logits = gpt_logits(adapter.model, ids)
        save_checkpoint(adapter, ckpt_dir)
        for tensor in adapter.model.prefix_tuning.params("default").values():
            tensor.zero_()
        load_checkpoint(adapter, ckpt_dir, restore_rng=False)
        reloaded = gpt_logits(adapter.model, ids)
    return {"logits": logits, "reloaded": reloaded}


def load_job(hf_dir: str, tp: int, pp: int, sp: bool, ckpt_dir: str, ids: torch.Tensor, fields: dict) -> dict:
    """A fresh prefix adapter (another seed) at this layout, load_checkpoint, logits; and what merge says."""
    from parallel_adapters.checkpoint.adapter_io import load_checkpoint
    from parallel_adapters.mcore.gpt import gpt_logits

    adapter, _, _ = _prefixed(hf_dir, tp, pp, sp, {"seed": 9, **fields}, None)
    load_checkpoint(adapter, ckpt_dir, restore_rng=False)
    with torch.no_grad():
        logits = gpt_logits(adapter.model, ids)
    try:
        adapter.merge_adapter()
        merge = ""
    except ValueError as exc:
        merge = str(exc)
    return {"logits": logits, "merge": merge}


def pretrained_job(hf_dir: str, tp: int, sp: bool, out_dir: str | None, peft_dir: str, ids: torch.Tensor,
                   fields: dict, state: dict) -> dict:
    """At TP=1 save_pretrained of the prefixed model set to `state` (one directory per rank); at
    any TP a fresh model from_pretrained from a directory PEFT itself wrote: logits of both (last
    stage), and what from_pretrained(is_trainable=True) says."""
    adapter, groups, settings = _prefixed(hf_dir, tp, 1, sp, fields, state)
    return pretrained_round_trip(adapter, groups, settings, hf_dir, out_dir, peft_dir, ids)
