"""Jobs for tests/mcore/test_grouped_moe_lora.py: the same tiny MoE GPT (float64) built with
SequentialMLP and with GroupedMLP experts (grouped_gemm replaced by tests/mcore/grouped_gemm_shim.py's
torch reference of its CUDA `gmm`), the GroupedMLP one given the SequentialMLP one's weights, both
with per-expert LoRA from the same config."""
from __future__ import annotations

import torch

from tests.mcore import moe_jobs, moe_lora_jobs

IDS = torch.arange(48).reshape(3, 16) * 7 % 256


def _copy_weights(grouped, sequential) -> None:
    """Every parameter by name; each GroupedMLP's weight1/weight2 from its SequentialMLP experts
    (weight1 viewed [E, H, F1] holds fc1's W_e^T, weight2 viewed [E, F2, H] fc2's)."""
    seq = dict(sequential.named_parameters())
    with torch.no_grad():
        for name, param in grouped.named_parameters():
            if name in seq:
                param.copy_(seq[name])
        for g_layer, s_layer in zip(grouped.decoder.layers, sequential.decoder.layers):
            experts, hidden = s_layer.mlp.experts.local_experts, g_layer.config.hidden_size
            w1 = g_layer.mlp.experts.weight1.view(len(experts), hidden, -1)
            w2 = g_layer.mlp.experts.weight2.view(len(experts), -1, hidden)
            for e, expert in enumerate(experts):
                w1[e].copy_(expert.linear_fc1.weight.t())
                w2[e].copy_(expert.linear_fc2.weight.t())


def _adapter_grads(adapter) -> dict[str, torch.Tensor]:
    """Gradient of every adapter tensor of this rank under its global (per-expert) name."""
    out = {}
    for _, host in adapter.adapter_layers():
        tensors = host.adapter_tensors("default")
        experts = getattr(host, "expert_names", None)
        for decl in host.tensor_decls("default"):
            grad = tensors[decl.name].grad
            if isinstance(experts, tuple):
                out.update({f"{e}.{decl.name}.default.weight": grad[i] for i, e in enumerate(experts)})
            else:
                out[f"{host.module_name}.{decl.name}.default.weight"] = grad
    return out


def parity_job(ep: int, etp: int, directory: str | None = None) -> dict:
    """Both models' adapter state, logits, adapter gradients, logits without adapters and merged;
    with `directory`, the GroupedMLP adapter's sharded checkpoint loaded into a SequentialMLP
    model whose adapter was drawn from another seed: its logits ("cross_logits")."""
    from parallel_adapters import LoraConfig, get_adapter_model
    from parallel_adapters.checkpoint.adapter_io import load_checkpoint, save_checkpoint
    from parallel_adapters.mcore.gpt import build_gpt, gpt_logits
    from tests.mcore import grouped_gemm_shim

    grouped_gemm_shim.install()
    groups = moe_jobs._setup(1, ep, etp, 1, 1234)
    settings = dict(params_dtype=torch.float64)
    sequential = build_gpt(moe_jobs._settings(False, **settings))
    grouped = build_gpt(moe_jobs._settings(False, moe_grouped_gemm=True, **settings))
    _copy_weights(grouped, sequential)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=moe_lora_jobs.TARGETS, init_lora_weights=False)
    out = {"grouped_type": type(grouped.decoder.layers[0].mlp.experts).__name__}
    for key, base in (("seq", sequential), ("grp", grouped)):
        adapter = get_adapter_model(base, config, groups=groups)
        out[f"{key}_state"] = {n: t.local.clone() for n, t in adapter.adapter_state_dict().items()}
        logits = adapter.model(IDS, None, None)
        logits.double().pow(2).mean().backward()
        out[f"{key}_logits"] = logits.detach()
        out[f"{key}_grads"] = _adapter_grads(adapter)
        with adapter.disable_adapter():
            out[f"{key}_base_logits"] = gpt_logits(adapter.model, IDS)
        if key == "grp" and directory is not None:
            path = save_checkpoint(adapter, directory)
            other = get_adapter_model(build_gpt(moe_jobs._settings(False, **settings)), config.replace(seed=1),
                                      groups=groups)
            load_checkpoint(other, path, restore_rng=False)
            out["cross_logits"] = gpt_logits(other.model, IDS)
        adapter.merge_adapter()
        out[f"{key}_merged_logits"] = gpt_logits(adapter.model, IDS)
    out["host_type"] = type(grouped.decoder.layers[0].mlp.experts).__name__
    return out


def refusals_job() -> dict:
    """What the GroupedMLP path refuses, by message: the model without grouped_gemm, DoRA,
    lora_dropout, share_expert_adapters, and targets covering some experts of a fused weight."""
    from parallel_adapters import LoraConfig, get_adapter_model
    from parallel_adapters.mcore.gpt import build_gpt
    from tests.mcore import grouped_gemm_shim

    from megatron.core.transformer.moe import grouped_gemm_util

    groups = moe_jobs._setup(1, 1, 1, 1, 1234)
    out = {}
    saved = grouped_gemm_util.grouped_gemm
    grouped_gemm_util.grouped_gemm = None  # as on a machine without the package
    try:
        build_gpt(moe_jobs._settings(False, moe_grouped_gemm=True))
    except ValueError as exc:
        out["no_package"] = str(exc)
    grouped_gemm_util.grouped_gemm = saved
    grouped_gemm_shim.install()
    cases = {"dora": dict(use_dora=True), "dropout": dict(lora_dropout=0.1), "share": dict(share_expert_adapters=True),
             "partial": dict(target_modules=r".*local_experts\.[01]\.linear_fc1")}
    for key, kw in cases.items():
        try:
            get_adapter_model(build_gpt(moe_jobs._settings(False, moe_grouped_gemm=True)),
                              LoraConfig(**{"r": 2, "target_modules": ["linear_fc1", "linear_fc2"], **kw}), groups=groups)
        except (ValueError, NotImplementedError) as exc:
            out[key] = str(exc)
    return out
