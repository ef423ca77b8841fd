"""Multi-rank jobs for tests/mcore/test_hf_bridge_moe.py (Qwen3, Qwen3-MoE, Mixtral imports).

Every job: CPU mode, Megatron parallel state at TP x EP (ETP = TP), build the GPT from the HF
config, import the HF weights counting the elements read, then logits and each router's routing.
"""
from __future__ import annotations

import dataclasses
from functools import partial

import torch

from tests.mcore.hf_jobs import _imported_model


def _setup(tp: int, ep: int, etp: int | None, pp: int = 1):
    from parallel_adapters.mcore import compat, cpu

    cpu.enable_cpu_mode()
    groups = compat.initialize_model_parallel(tp, pp, expert_parallel=ep, expert_tensor_parallel=etp)
    cpu.model_parallel_seed(1234)
    return groups


def _store(maps: dict, layer: int, module, args, output) -> None:
    maps[layer] = (output[1].detach().clone(), output[0].detach().clone())  # TopKRouter: (probs, map)


def import_job(hf_dir: str, tp: int, ep: int, input_ids: torch.Tensor, etp: int | None = None,
               export_dir: str | None = None, derive_config: bool = True, pp: int = 1) -> dict:
    """Logits, routing (this TP rank's sequence slice under SP: [seq/tp, batch, experts], as the
    router sees it), elements read vs held, and an optional export_hf_checkpoint (config.json
    derived from the model, or copied from hf_dir)."""
    from parallel_adapters.mcore.gpt import gpt_logits
    from parallel_adapters.mcore.hf_bridge import export_hf_checkpoint

    groups = _setup(tp, ep, etp, pp)
    model, settings, read = _imported_model(hf_dir, groups, overrides={"sequence_parallel": tp > 1})
    maps: dict = {}
    handles = [layer.mlp.router.register_forward_hook(partial(_store, maps, layer.layer_number - 1))
               for layer in model.decoder.layers if hasattr(layer.mlp, "router")]
    with torch.no_grad():
        logits = gpt_logits(model, input_ids)
    for h in handles:
        h.remove()
    batch = input_ids.shape[0]
    routing = {k: (m.reshape(-1, batch, m.shape[-1]), p.reshape(-1, batch, p.shape[-1])) for k, (m, p) in maps.items()}
    if export_dir is not None:
        export_hf_checkpoint(model, export_dir, groups, hf_config=None if derive_config else hf_dir)
    return {
        "logits": logits, "routing": routing, "settings": dataclasses.asdict(settings),
        "elements_read": read, "elements_held": sum(p.numel() for p in model.parameters()),
        "tp_rank": groups.tp_rank, "pp_rank": groups.pp_rank, "ep_rank": groups.ep_rank, "hidden": settings.hidden_size,
        "param_names": [n for n, _ in model.named_parameters()],
    }


def expert_adapter_job(hf_dir: str, ckpt_dir: str, input_ids: torch.Tensor, tp: int, ep: int,
                       targets: list[str], train_steps: int = 0) -> dict:
    """TP x EP: import, LoRA (non-zero from the start) on `targets` (routed experts included),
    `train_steps` AdamW steps on next-token loss over `input_ids` (every rank the same rows),
    base / adapted logits, save_checkpoint."""
    from parallel_adapters import LoraConfig, get_adapter_model
    from parallel_adapters.checkpoint.adapter_io import save_checkpoint
    from parallel_adapters.mcore.gpt import gpt_logits

    groups = _setup(tp, ep, None)
    model, _, _ = _imported_model(hf_dir, groups, overrides={"sequence_parallel": tp > 1})
    adapter = get_adapter_model(model, LoraConfig(r=3, lora_alpha=6, target_modules=targets,
                                                  init_lora_weights=False, seed=4), groups=groups)
    optimizer = torch.optim.AdamW([p for p in adapter.parameters() if p.requires_grad], lr=1e-2)
    labels = torch.roll(input_ids, -1, dims=1)
    for _ in range(train_steps):
        optimizer.zero_grad()
        adapter.model(input_ids, None, None, labels=labels).mean().backward()
        adapter.finalize_grads(data_parallel=True)
        optimizer.step()
    with torch.no_grad():
        with adapter.disable_adapter():
            base = gpt_logits(adapter.model, input_ids)
        adapted = gpt_logits(adapter.model, input_ids)
    save_checkpoint(adapter, ckpt_dir)
    return {"base": base, "adapted": adapted}
