"""Multi-rank jobs for the Hugging Face bridge and the PEFT export tests (run by WorkerPool).

Every job: CPU mode, Megatron parallel state, seed, then build the GPT from the HF config and
import the HF weights.  Results come back as plain tensors / dicts.
"""
from __future__ import annotations

import dataclasses

import torch

TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]


def _setup(tp: int, pp: int):
    from parallel_adapters.mcore import compat, cpu

    cpu.enable_cpu_mode()
    groups = compat.initialize_model_parallel(tp, pp)
    cpu.model_parallel_seed(1234)
    return groups


def _imported_model(hf_dir: str, groups, init_weights: bool = True, overrides: dict | None = None):
    """build_gpt(gpt_settings_from_hf(hf_dir, **overrides)) + import_hf_checkpoint, counting the
    elements read."""
    from parallel_adapters.hf.files import HFCheckpoint
    from parallel_adapters.mcore.gpt import build_gpt
    from parallel_adapters.mcore.hf_bridge import gpt_settings_from_hf, import_hf_checkpoint

    settings = gpt_settings_from_hf(hf_dir, **(overrides or {}))
    model = build_gpt(settings, init_weights=init_weights)
    original, counted = HFCheckpoint.read, [0]

    def counting_read(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        counted[0] += out.numel()
        return out

    HFCheckpoint.read = counting_read
    try:
        import_hf_checkpoint(model, hf_dir, groups)
    finally:
        HFCheckpoint.read = original
    model.eval()
    return model, settings, counted[0]


def import_job(hf_dir: str, tp: int, pp: int, input_ids: torch.Tensor, export_dir: str | None = None,
               export_config: bool = True, max_shard_bytes: int = 5 * 10**9, init_weights: bool = True) -> dict:
    """Logits of the imported model (None off the last stage), elements read vs held, and an
    optional export_hf_checkpoint round trip."""
    from parallel_adapters.mcore.gpt import gpt_logits
    from parallel_adapters.mcore.hf_bridge import export_hf_checkpoint, hf_config_from_model

    groups = _setup(tp, pp)
    model, settings, read = _imported_model(hf_dir, groups, init_weights)
    with torch.no_grad():
        logits = gpt_logits(model, input_ids)
    if export_dir is not None:
        export_hf_checkpoint(model, export_dir, groups, hf_config=hf_dir if export_config else None,
                             max_shard_bytes=max_shard_bytes)
    return {
        "logits": logits,
        "settings": dataclasses.asdict(settings),
        "elements_read": read,
        "elements_held": sum(p.numel() for p in model.parameters()),
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "hidden": settings.hidden_size,
        "tp_rank": groups.tp_rank,
        "derived_config": hf_config_from_model(model),
    }


def mismatch_job(hf_dir: str) -> str:
    """import_hf_checkpoint into a model built from other settings: the error message."""
    from parallel_adapters.mcore.gpt import GPTSettings, build_gpt
    from parallel_adapters.mcore.hf_bridge import import_hf_checkpoint

    groups = _setup(1, 1)
    model = build_gpt(GPTSettings(num_layers=2, hidden_size=48, ffn_hidden_size=96, num_attention_heads=4,
                                  num_query_groups=2, vocab_size=101))
    try:
        import_hf_checkpoint(model, hf_dir, groups)
    except ValueError as exc:
        return str(exc)
    return ""


def peft_job(hf_dir: str, ckpt_dir: str, input_ids: torch.Tensor) -> dict:
    """TP=2: import, LoRA with non-zero B on all four linears (one rank and one alpha overridden),
    base / adapted logits, TP-replica agreement of replicated factors, sharded save."""
    from parallel_adapters import LoraConfig, get_adapter_model
    from parallel_adapters.checkpoint.sharded import save_sharded
    from parallel_adapters.distributed.collectives import all_gather_tensor
    from parallel_adapters.mcore.gpt import gpt_logits

    groups = _setup(2, 1)
    model, _, _ = _imported_model(hf_dir, groups)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, seed=3,
                        rank_pattern={"layers.1.self_attention.linear_qkv": 6},
                        alpha_pattern={"layers.0.mlp.linear_fc2": 3.0})
    adapter = get_adapter_model(model, config, groups=groups)
    with torch.no_grad():
        with adapter.disable_adapter():
            base = gpt_logits(adapter.model, input_ids)
        adapted = gpt_logits(adapter.model, input_ids)
    state = adapter.adapter_state_dict()
    replicas = {}
    for name, t in state.items():
        if t.spec.replicated:
            copies = all_gather_tensor(t.local.contiguous(), groups.tp_group)
            replicas[name] = all(torch.equal(c, copies[0]) for c in copies)
    save_sharded(ckpt_dir, state, groups, config=config.to_dict(), rng_state=False)
    return {"base": base, "adapted": adapted, "replicas": replicas}


def adapter_export_job(hf_dir: str, ckpt_dir: str, input_ids: torch.Tensor, targets: list[str],
                       config_fields: dict) -> dict:
    """TP=2: import, an adapter of `LoraConfig(**config_fields)` on `targets` (non-zero from the
    start), base / adapted logits, sharded save with the adapter's kind recorded."""
    from parallel_adapters import LoraConfig, get_adapter_model
    from parallel_adapters.checkpoint.adapter_io import checkpoint_config
    from parallel_adapters.checkpoint.sharded import save_sharded
    from parallel_adapters.mcore.gpt import gpt_logits

    groups = _setup(2, 1)
    model, _, _ = _imported_model(hf_dir, groups)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, seed=3, **config_fields)
    adapter = get_adapter_model(model, config, groups=groups)
    with torch.no_grad():
        for name, param in adapter.named_parameters():
            if "lora_magnitude_vector" in name:  # move DoRA's magnitude off its initial norms, alike on every rank
                param.add_(0.3 * torch.cos(7 * param))
        with adapter.disable_adapter():
            base = gpt_logits(adapter.model, input_ids)
        adapted = gpt_logits(adapter.model, input_ids)
    save_sharded(ckpt_dir, adapter.adapter_state_dict(), groups, config=checkpoint_config(adapter), rng_state=False)
    return {"base": base, "adapted": adapted}
