"""Multi-rank jobs for the prompt-tuning tests (run by WorkerPool): a tiny HF Llama imported into
Megatron at the given TP / PP / SP, a prompt adapter with given values, then logits, loss,
gradients, training steps or collective counts."""
from __future__ import annotations

import dataclasses

import torch

from tests.harness import counting

N_VIRTUAL = 5


def _prompted(hf_dir: str, tp: int, pp: int, sp: bool, config_fields: dict | None = None,
              values: torch.Tensor | None = None, config=None):
    from parallel_adapters import PromptTuningConfig, get_adapter_model
    from parallel_adapters.mcore import compat, cpu
    from parallel_adapters.mcore.gpt import build_gpt
    from parallel_adapters.mcore.hf_bridge import gpt_settings_from_hf, import_hf_checkpoint

    cpu.enable_cpu_mode()
    groups = compat.initialize_model_parallel(tp, pp)
    cpu.model_parallel_seed(1234)
    settings = dataclasses.replace(gpt_settings_from_hf(hf_dir), sequence_parallel=sp)
    model = build_gpt(settings, init_weights=False)
    import_hf_checkpoint(model, hf_dir, groups)
    model.eval()
    config = config or PromptTuningConfig(num_virtual_tokens=N_VIRTUAL, **(config_fields or {}))
    adapter = get_adapter_model(model, config, groups=groups)
    if values is not None and groups.pp_rank == 0:
        with torch.no_grad():
            adapter.model.prompt_tuning.prompt_embeddings["default"].weight.copy_(values)
    return adapter, groups, settings


def _prompt(adapter):
    holder = adapter.model.prompt_tuning.prompt_embeddings
    return holder["default"].weight if "default" in holder else None


def _logits_and_loss(adapter, ids: torch.Tensor, labels: torch.Tensor, pp: int, vocab: int):
    """Logits and PEFT's causal-LM loss over n + T positions (last stage; None elsewhere), with the
    backward run: directly at PP=1, through the pipeline schedule otherwise (logits then no-grad)."""
    from parallel_adapters.adapters.prompt import causal_lm_loss
    from parallel_adapters.mcore.gpt import gpt_logits
    from parallel_adapters.mcore.schedule import pipeline_forward_backward

    if pp == 1:
        logits = gpt_logits(adapter.model, ids)
        loss = causal_lm_loss(logits, labels, N_VIRTUAL)
        loss.backward()
        return logits.detach(), loss.detach()
    with torch.no_grad():
        logits = gpt_logits(adapter.model, ids)

    def loss_fn(batch, output):
        value = causal_lm_loss(output[..., :vocab], batch["labels"], N_VIRTUAL)
        return value, {"loss": value.detach().clone()}
    reports = pipeline_forward_backward(adapter.model, [{"input_ids": ids, "labels": labels}], loss_fn)
    return logits, reports[0]["loss"] if reports else None


def pretrained_round_trip(adapter, groups, settings, hf_dir: str, out_dir: str | None, peft_dir: str,
                          ids: torch.Tensor) -> dict:
    """save_pretrained of `adapter` into out_dir/rank<r> (when given); a fresh model's
    from_pretrained of PEFT's own `peft_dir`: both logits, the loaded model's trainable count and
    config type, and what from_pretrained(is_trainable=True) says."""
    import torch.distributed as dist

    from parallel_adapters import AdapterModel
    from parallel_adapters.mcore.gpt import build_gpt, gpt_logits
    from parallel_adapters.mcore.hf_bridge import import_hf_checkpoint

    mine = None
    if out_dir is not None:
        mine = f"{out_dir}/rank{dist.get_rank()}"
        adapter.save_pretrained(mine)
    model = build_gpt(settings, init_weights=False)
    import_hf_checkpoint(model, hf_dir, groups)
    loaded = AdapterModel.from_pretrained(model.eval(), peft_dir, groups=groups)
    try:
        AdapterModel.from_pretrained(build_gpt(settings, init_weights=False), peft_dir, groups=groups,
                                     is_trainable=True)
        trainable_load = ""
    except ValueError as exc:
        trainable_load = str(exc)
    with torch.no_grad():
        return {"dir": mine, "saved": gpt_logits(adapter.model, ids), "loaded": gpt_logits(loaded.model, ids),
                "config": type(loaded.peft_config["default"]).__name__, "trainable_load": trainable_load,
                "trainable": sum(p.requires_grad for p in loaded.parameters())}


def parity_job(hf_dir: str, tp: int, pp: int, sp: bool, ids: torch.Tensor, labels: torch.Tensor,
               values: torch.Tensor) -> dict:
    """Logits (last stage), PEFT's loss and the prompt's finalized gradient (first stage)."""
    adapter, groups, settings = _prompted(hf_dir, tp, pp, sp, values=values)
    logits, loss = _logits_and_loss(adapter, ids, labels, pp, settings.vocab_size)
    adapter.finalize_grads()
    prompt = _prompt(adapter)
    return {"logits": logits, "loss": loss, "grad": None if prompt is None else prompt.grad.clone(),
            "state": sorted(adapter.adapter_state_dict())}


def training_job(hf_dir: str, tp: int, sp: bool, ids: torch.Tensor, labels: torch.Tensor, steps: int = 5) -> dict:
    """`steps` AdamW steps on the prompt alone (RANDOM init, seeded): losses and the final prompt."""
    from parallel_adapters.adapters.prompt import causal_lm_loss
    from parallel_adapters.mcore.gpt import gpt_logits

    adapter, groups, _ = _prompted(hf_dir, tp, 1, sp, config_fields={"seed": 3})
    params = [p for p in adapter.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = causal_lm_loss(gpt_logits(adapter.model, ids), labels, N_VIRTUAL)
        loss.backward()
        adapter.finalize_grads()
        optimizer.step()
        losses.append(loss.item())
    return {"losses": losses, "prompt": _prompt(adapter).detach().clone(), "trainable": len(params)}


def collectives_job(hf_dir: str, sp: bool, variant: str, ids: torch.Tensor, labels: torch.Tensor,
                    encoder: dict | None = None):
    """Collectives of one forward+backward at TP=2: the frozen base with only the word embedding
    trainable, or the prompt adapter (P-tuning's with PromptEncoderConfig(**encoder)); and of
    finalize_grads."""
    from parallel_adapters import PromptEncoderConfig
    from parallel_adapters.adapters.prompt import causal_lm_loss
    from parallel_adapters.mcore.gpt import gpt_logits

    if encoder is None:
        adapter, _, _ = _prompted(hf_dir, 2, 1, sp, values=torch.ones(N_VIRTUAL, 48))
    else:
        adapter, _, _ = _prompted(hf_dir, 2, 1, sp, config=PromptEncoderConfig(num_virtual_tokens=N_VIRTUAL, **encoder))
    n = N_VIRTUAL
    if variant == "frozen_base":
        adapter.disable_adapter_layers()
        adapter.model.embedding.word_embeddings.weight.requires_grad_(True)
        n = 0
    with counting.counted() as step:
        causal_lm_loss(gpt_logits(adapter.model, ids), labels, n).backward()
    with counting.counted() as fin:
        adapter.finalize_grads()
    return dict(step.calls), dict(fin.calls)


def init_job(hf_dir: str, tp: int, text_ids: list[int]) -> dict:
    """The initial prompt of each init at this TP size, and what merge says."""
    out = {}
    for init, fields in (("RANDOM", {}), ("SAMPLE_VOCAB", {}), ("TEXT", {"prompt_tuning_init_text": "x",
                                                                       "init_token_ids": text_ids})):
        adapter, _, _ = _prompted(hf_dir, tp, 1, False, config_fields={"prompt_tuning_init": init, "seed": 4, **fields})
        out[init] = _prompt(adapter).detach().clone()
        from megatron.core import parallel_state
        parallel_state.destroy_model_parallel()
    try:
        adapter.merge_adapter()
        out["merge"] = ""
    except ValueError as exc:
        out["merge"] = str(exc)
    return out


def save_job(hf_dir: str, tp: int, pp: int, sp: bool, ckpt_dir: str, ids: torch.Tensor, values: torch.Tensor) -> dict:
    """Logits of the prompted model with `values`, saved by save_checkpoint; then the prompt
    overwritten and load_checkpoint bringing it back (the logits again)."""
    from parallel_adapters.checkpoint.adapter_io import load_checkpoint, save_checkpoint
    from parallel_adapters.mcore.gpt import gpt_logits

    adapter, groups, _ = _prompted(hf_dir, tp, pp, sp, values=values)
    with torch.no_grad():
        logits = gpt_logits(adapter.model, ids)
        save_checkpoint(adapter, ckpt_dir)
        if _prompt(adapter) is not None:
            _prompt(adapter).zero_()
        load_checkpoint(adapter, ckpt_dir, restore_rng=False)
        reloaded = gpt_logits(adapter.model, ids)
    prompt = _prompt(adapter)
    return {"logits": logits, "reloaded": reloaded, "prompt": None if prompt is None else prompt.detach().clone()}


def load_job(hf_dir: str, tp: int, pp: int, sp: bool, ckpt_dir: str, ids: torch.Tensor) -> dict:
    """A fresh prompt adapter (seeded RANDOM) at this layout, load_checkpoint, logits."""
    from parallel_adapters.checkpoint.adapter_io import load_checkpoint
    from parallel_adapters.mcore.gpt import gpt_logits

    adapter, _, _ = _prompted(hf_dir, tp, pp, sp, config_fields={"seed": 9})
    load_checkpoint(adapter, ckpt_dir, restore_rng=False)
    with torch.no_grad():
        logits = gpt_logits(adapter.model, ids)
    prompt = _prompt(adapter)
    return {"logits": logits, "prompt": None if prompt is None else prompt.detach().clone()}


def pretrained_job(hf_dir: str, out_dir: str, peft_dir: str, ids: torch.Tensor, values: torch.Tensor) -> dict:
    """TP=1: save_pretrained of the prompted model (one directory per rank), then a fresh model
    from_pretrained from a directory PEFT itself wrote: logits of both."""
    import torch.distributed as dist

    from parallel_adapters import AdapterModel
    from parallel_adapters.mcore.gpt import build_gpt, gpt_logits
    from parallel_adapters.mcore.hf_bridge import import_hf_checkpoint

    adapter, groups, settings = _prompted(hf_dir, 1, 1, False, values=values)
    mine = f"{out_dir}/rank{dist.get_rank()}"
    adapter.save_pretrained(mine)
    model = build_gpt(settings, init_weights=False)
    import_hf_checkpoint(model, hf_dir, groups)
    loaded = AdapterModel.from_pretrained(model.eval(), peft_dir, groups=groups)
    with torch.no_grad():
        return {"dir": mine, "saved": gpt_logits(adapter.model, ids), "loaded": gpt_logits(loaded.model, ids),
                "trainable": sum(p.requires_grad for p in loaded.parameters())}


def p_tuning_job(hf_dir: str, tp: int, sp: bool, ids: torch.Tensor, labels: torch.Tensor, fields: dict,
                 state: dict, pp: int = 1) -> dict:
    """P-tuning (PromptEncoderConfig(**fields), the encoder's tensors set to `state`): logits and
    PEFT's loss (last stage), the encoder's finalized gradients by name (first stage; none on the
    others), and the checkpoint names."""
    from parallel_adapters import PromptEncoderConfig

    config = PromptEncoderConfig(num_virtual_tokens=N_VIRTUAL, **fields)
    adapter, groups, settings = _prompted(hf_dir, tp, pp, sp, config=config)
    holder = adapter.model.prompt_tuning.prompt_embeddings
    encoder = holder["default"] if "default" in holder else None
    if encoder is not None:
        encoder.load_state_dict(state)
    logits, loss = _logits_and_loss(adapter, ids, labels, pp, settings.vocab_size)
    adapter.finalize_grads()
    return {"logits": logits, "loss": loss, "pp_rank": groups.pp_rank,
            "grads": {} if encoder is None else {n: p.grad.clone() for n, p in encoder.named_parameters()},
            "trainable": sorted(n for n, p in adapter.named_parameters() if p.requires_grad),
            "state": sorted(adapter.adapter_state_dict())}


def p_tuning_pretrained_job(hf_dir: str, tp: int, sp: bool, out_dir: str | None, peft_dir: str, ids: torch.Tensor,
                            fields: dict, state: dict) -> dict:
    """At TP=1 save_pretrained of the P-tuning model with its encoder set to `state` (one directory
    per rank); at any TP a fresh model from_pretrained from a directory PEFT itself wrote: logits of
    both, the loaded adapter's config and trainable count, and what is_trainable=True says."""
    from parallel_adapters import PromptEncoderConfig

    adapter, groups, settings = _prompted(hf_dir, tp, 1, sp, config=PromptEncoderConfig(num_virtual_tokens=N_VIRTUAL,
                                                                                         **fields))
    adapter.model.prompt_tuning.prompt_embeddings["default"].load_state_dict(state)
    return pretrained_round_trip(adapter, groups, settings, hf_dir, out_dir, peft_dir, ids)


def p_tuning_save_job(hf_dir: str, ckpt_dir: str, ids: torch.Tensor, fields: dict, state: dict) -> torch.Tensor:
    """TP=2 + SP P-tuning with the encoder set to `state`: logits, then save_checkpoint."""
    from parallel_adapters import PromptEncoderConfig
    from parallel_adapters.checkpoint.adapter_io import save_checkpoint
    from parallel_adapters.mcore.gpt import gpt_logits

    adapter, _, _ = _prompted(hf_dir, 2, 1, True, config=PromptEncoderConfig(num_virtual_tokens=N_VIRTUAL, **fields))
    adapter.model.prompt_tuning.prompt_embeddings["default"].load_state_dict(state)
    with torch.no_grad():
        logits = gpt_logits(adapter.model, ids)
    save_checkpoint(adapter, ckpt_dir)
    return logits
