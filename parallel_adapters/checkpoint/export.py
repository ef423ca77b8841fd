"""Export an adapter as a Hugging Face PEFT adapter: `adapter_model.safetensors` + `adapter_config.json`.

Offline and single-process (no megatron, no torch.distributed), for any registered kind.  From
full tensors under Megatron names (from a checkpoint: read one module at a time, the file's header
fixed first from the shapes by `hf_adapter.plan_modules`), each Megatron module's adapter becomes
its HF modules' (checkpoint/hf_adapter.py says how; for LoRA):

    linear_qkv  -> q_proj, k_proj, v_proj   the same A for all three, B split per query group
                                            [q_g; k_g; v_g] (gathered rows: one copy)
    linear_fc1  -> gate_proj, up_proj       the same A for both, B split into the [gate; up] halves
                                            (row views, no copy)
    linear_proj -> o_proj, linear_fc2 -> down_proj      as is
    word_embeddings -> embed_tokens, output_layer -> lm_head     vocabulary padding dropped

The tensors are not copied where they need not be (they may share memory with the input tensors
and with each other): the file is written straight from their memory, one A three times for q/k/v.

Keys are `base_model.model.<HF module>.<PEFT's tensor key>` (PEFT inserts the adapter name itself;
any other prefix only warns "missing adapter keys" and leaves B at zero); the kind writes
adapter_config.json (LoRA: per-module ranks and alphas that differ from the most common ones go
into `rank_pattern` / `alpha_pattern` keyed by full HF module paths).  The same per-HF-module
adapters drive the offline merge (merge.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from parallel_adapters.checkpoint.decomposition_export import convert_view
from parallel_adapters.checkpoint.expert_adapter import FUSED, peft_expert_tensors
from parallel_adapters.checkpoint.export_prompt import is_prompt_stored_config, write_prompt_export
from parallel_adapters.checkpoint.export_prefix import is_prefix_stored_config, write_prefix_export
from parallel_adapters.checkpoint.files import SafetensorsWriter, write_json
from parallel_adapters.checkpoint.finite import ALLOW_FLAG, check_config, check_tensor, delta_is_finite
from parallel_adapters.checkpoint.hf_adapter import (  # noqa: F401  (PEFT_PREFIX, hf_module_adapters: the API)
    PEFT_PREFIX, HFModuleAdapter, ModulePlan, hf_module_adapters, plan_modules, target_modules,
)
from parallel_adapters.checkpoint.outputs import (
    StagedDirectory, check_inputs_apart, check_output_dir, checkpoint_inputs,
)
from parallel_adapters.hf.config import LlamaShape, read_hf_config
from parallel_adapters.hf.mapping import EXPERT_PREFIX
from parallel_adapters.user_errors import UserError

ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"


def peft_adapter_config(adapters: Mapping[str, HFModuleAdapter], adapter_config: Mapping[str, Any],
                        hf_config: Mapping[str, Any], base_model_name_or_path: str | None = None,
                        expert_plans: list[ModulePlan] = ()) -> dict:
    """adapter_config.json for PEFT: the kind's fields for these HF modules' hyperparameters (and,
    for adapters on routed experts, PEFT's `target_parameters`)."""
    shape = LlamaShape.from_config(hf_config, "hf_config")
    if not adapters and not expert_plans:
        raise ValueError("export: no adapter tensors to export")
    hparams = {m: a.hparams for m, a in adapters.items()} or {"experts": expert_plans[0].hparams}
    kind = next(iter(adapters.values())).kind if adapters else expert_plans[0].kind
    config = kind.peft_config(adapter_config, hparams, target_modules(adapters, shape), base_model_name_or_path)
    if expert_plans:
        config["target_parameters"] = sorted({f"experts.{FUSED[p.module.rsplit('.', 1)[-1]]}" for p in expert_plans},
                                             key=lambda name: name != "experts.gate_up_proj")  # PEFT's nesting order
    return config


def _expert_tensors(expert_plans: list[ModulePlan], read: Callable[[str], torch.Tensor], config: Mapping[str, Any],
                    hf_cfg: Mapping[str, Any], options: _ExportOptions) -> dict[str, torch.Tensor]:
    """The routed experts' adapters packed into PEFT's target_parameters layout; ValueError naming the
    module and the field for what that layout cannot hold (it has one r and alpha per fused parameter,
    no dropout and no DoRA)."""
    if not expert_plans:
        return {}
    for plan in expert_plans:
        if plan.kind.name != "lora":
            raise ValueError(f"{plan.module}: PEFT's target_parameters (fused expert parameters) take LoRA only, "
                             f"not {plan.kind.name}")
        if (plan.hparams["r"], plan.hparams["lora_alpha"]) != (config["r"], config["lora_alpha"]):
            raise ValueError(f"{plan.module}: r={plan.hparams['r']}, lora_alpha={plan.hparams['lora_alpha']}; "
                             f"PEFT's target_parameters use the config's r={config['r']}, "
                             f"lora_alpha={config['lora_alpha']} for every expert")
    if config.get("lora_dropout"):
        raise ValueError(f"export: lora_dropout={config['lora_dropout']} on routed experts; PEFT's target_parameters "
                         "LoRA has no dropout (train the experts' adapters with lora_dropout 0)")
    shape = LlamaShape.from_config(hf_cfg, "hf_config")
    tensors = {}
    for plan in expert_plans:
        for name, key in plan.keys.items():
            tensors[key] = read(key)
        _check_tensors(plan, {n: tensors[k] for n, k in plan.keys.items()}, options)
    packed, _ = peft_expert_tensors(tensors, shape.num_experts, shape.num_layers)
    return {name: t.to(options.dtype or t.dtype) for name, t in packed.items()}


def peft_tensors(adapters: Mapping[str, HFModuleAdapter], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The adapter_model.safetensors dict: the tensors as they are, cast to `dtype`.  Values may
    share memory (q/k/v hold one A); the project's safetensors writers write each value's own bytes,
    so nothing is copied for that (safetensors' own save_file would refuse them)."""
    out = {}
    for module, adapter in sorted(adapters.items()):
        out.update(adapter.peft_tensors(module, dtype))
    return out


def export_peft(source: str | Path | Mapping[str, torch.Tensor], out_dir: str | Path,
                hf_config: str | Path | Mapping[str, Any] | None, adapter_config: Mapping[str, Any] | None = None, *,
                adapter_name: str | None = None, base_model_name_or_path: str | None = None,
                dtype: torch.dtype | None = None, overwrite: bool = False, allow_nonfinite: bool = False,
                convert_to_lora: bool = False) -> Path:
    """Write a PEFT adapter directory.

    A prompt-tuning adapter (its config's adapter_kind / peft_type) is written in PEFT's
    PROMPT_TUNING format instead (export_prompt.py), a prefix-tuning one in PREFIX_TUNING's
    (export_prefix.py).
    `source`: a sharded checkpoint directory (consolidated here; its adapter_config.json is used
    unless `adapter_config` is given) or full factors under Megatron names (then `adapter_config`,
    the adapter's LoraConfig fields as a dict or LoraConfig, is required).
    `hf_config`: the base model's config.json (dict, file or model directory; a directory also
    becomes base_model_name_or_path unless one is given); None: the one the checkpoint records,
    with its recorded base path (checkpoint/base_model.py).

    `out_dir` is checked first (`outputs.check_output_dir`: never an input, an HF model or unrelated
    data; a previous export only with `overwrite`).  Both files are written into a hidden sibling
    renamed into place at the end, so a failed export leaves nothing behind and an old export
    intact.  From a checkpoint, the weights are written while the shard files' checksums are still
    being computed, and published only once they pass.  NaN/inf factors or config values, or a
    delta scaling * B @ A that overflows `dtype`, are refused unless `allow_nonfinite`.
    A PiSSA/OLoRA adapter (its initial factors stored) is refused unless `convert_to_lora`, which
    writes the rank-2r LoRA for the original base (checkpoint/decomposition_export.py)."""
    from_checkpoint = isinstance(source, (str, Path))
    if adapter_config is None and not from_checkpoint:
        raise ValueError("export_peft: adapter_config is required when source is a tensor dict")
    if hf_config is None and not from_checkpoint:
        raise ValueError("export_peft: hf_config is required when source is a tensor dict")
    inputs = checkpoint_inputs(source) if from_checkpoint else []
    if isinstance(hf_config, (str, Path)):
        inputs.append(("Hugging Face base", hf_config if Path(hf_config).is_dir() else Path(hf_config).parent))
    out = check_output_dir(out_dir, "export", inputs, overwrite)
    if hf_config is None:
        hf_config, recorded_path = _recorded_base(source)
        check_inputs_apart(out, "export", [("Hugging Face base", recorded_path)])  # never write into it either
        base_model_name_or_path = base_model_name_or_path or recorded_path
    hf_cfg = read_hf_config(hf_config)
    if base_model_name_or_path is None and isinstance(hf_config, (str, Path)) and Path(hf_config).is_dir():
        base_model_name_or_path = str(hf_config)
    options = _ExportOptions(adapter_name, base_model_name_or_path, dtype, allow_nonfinite, convert_to_lora)
    with StagedDirectory(out, "export") as tmp:
        if not from_checkpoint:
            _write_export({n: t.to("meta") for n, t in source.items()}, source.__getitem__, adapter_config, hf_cfg,
                          tmp, options)
            return out
        from parallel_adapters.checkpoint.reader import CheckpointReader

        with CheckpointReader(source) as reader:
            stored = reader.config()
            meta = {n: torch.empty(info.global_shape, dtype=info.dtype, device="meta")
                    for n, info in reader.tensors.items()}
            with reader.deferred_verification():  # the shards are hashed while the export is written
                _write_export(meta, reader.read_full, stored if adapter_config is None else adapter_config, hf_cfg,
                              tmp, options)
    return out  # every shard file verified, the directory renamed into place


def _recorded_base(ckpt_dir: str | Path) -> tuple[dict, str | None]:
    from parallel_adapters.checkpoint.base_model import export_base
    from parallel_adapters.checkpoint.reader import CheckpointReader

    with CheckpointReader(ckpt_dir) as reader:
        return export_base(reader)


@dataclass(frozen=True)
class _ExportOptions:
    adapter_name: str | None
    base_model_name_or_path: str | None
    dtype: torch.dtype | None
    allow_nonfinite: bool
    convert_to_lora: bool = False


def _write_export(meta: Mapping[str, torch.Tensor], read: Callable[[str], torch.Tensor],
                  adapter_config: Mapping[str, Any] | None, hf_cfg: Mapping[str, Any], tmp: Path,
                  options: _ExportOptions) -> None:
    """adapter_model.safetensors and adapter_config.json into `tmp`, one Megatron module at a time.
    The file's header and the config come from the same plan run on `meta` (the tensors on the meta
    device), so memory holds one module's tensors."""
    if hasattr(adapter_config, "to_dict"):
        adapter_config = adapter_config.to_dict()
    check_config(adapter_config, "export: the adapter config", options.allow_nonfinite)
    if is_prompt_stored_config(adapter_config):  # a model-level adapter: PEFT's PROMPT_TUNING files
        write_prompt_export(meta, read, adapter_config, hf_cfg, tmp, ADAPTER_WEIGHTS_FILE, ADAPTER_CONFIG_FILE, options)
        return
    if is_prefix_stored_config(adapter_config):  # PEFT's PREFIX_TUNING files (export_prefix.py)
        write_prefix_export(meta, read, adapter_config, hf_cfg, tmp, ADAPTER_WEIGHTS_FILE, ADAPTER_CONFIG_FILE, options)
        return
    meta, read, adapter_config = convert_view(meta, read, adapter_config, options.convert_to_lora, "export")
    plans = plan_modules(meta, adapter_config, hf_cfg, options.adapter_name)
    expert_plans = [p for p in plans if EXPERT_PREFIX in p.module]
    plans = [p for p in plans if EXPERT_PREFIX not in p.module]
    per_module = [plan.hf_adapters({n: meta[k] for n, k in plan.keys.items()}) for plan in plans]
    config = peft_adapter_config({hf: a for part in per_module for hf, a in part.items()}, adapter_config, hf_cfg,
                                 options.base_model_name_or_path, expert_plans)
    experts = _expert_tensors(expert_plans, read, config, hf_cfg, options)
    layout = [(n, t.dtype, tuple(t.shape)) for part in per_module
              for n, t in peft_tensors(part, options.dtype).items()]
    layout += [(n, t.dtype, tuple(t.shape)) for n, t in experts.items()]
    writer = SafetensorsWriter(tmp / ADAPTER_WEIGHTS_FILE, layout, metadata={"format": "pt"}, checksum=False)
    try:
        for plan in plans:
            tensors = {name: read(key) for name, key in plan.keys.items()}
            _check_tensors(plan, tensors, options)
            for name, tensor in peft_tensors(plan.hf_adapters(tensors), options.dtype).items():
                writer.write(name, tensor)
        for name, tensor in experts.items():
            writer.write(name, tensor)
        writer.close()
    except BaseException:
        writer.discard()
        raise
    write_json(tmp / ADAPTER_CONFIG_FILE, config)


def _check_tensors(plan: ModulePlan, tensors: Mapping[str, torch.Tensor], options: _ExportOptions) -> None:
    """The tensors are finite, and so is a low-rank delta they add to the base in the exported dtype."""
    if options.allow_nonfinite:
        return
    for name, tensor in tensors.items():
        check_tensor(plan.keys[name], tensor, "export")
    factors = plan.kind.low_rank_factors(tensors)
    if factors is None:
        return
    a, b, scaling = factors[0], factors[1], plan.hparams["scaling"]
    dtype = options.dtype or a.dtype
    if not delta_is_finite(a, b, scaling, dtype):
        raise UserError(f"export: {plan.module}: scaling * B @ A overflows {str(dtype).replace('torch.', '')} "
                        f"(scaling {scaling}); refusing it (pass {ALLOW_FLAG} to write it anyway)")


def load_checkpoint_factors(ckpt_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(full factors under Megatron names, the checkpoint's adapter config), verified by the reader."""
    from parallel_adapters.checkpoint.consolidate import consolidate_from
    from parallel_adapters.checkpoint.reader import CheckpointReader

    with CheckpointReader(ckpt_dir) as reader:
        return consolidate_from(reader), reader.config()


def export_peft_from_checkpoint(ckpt_dir: str | Path, out_dir: str | Path,
                                hf_config: str | Path | Mapping[str, Any] | None = None, *, adapter_name: str | None = None,
                                base_model_name_or_path: str | None = None, dtype: torch.dtype | None = None,
                                overwrite: bool = False, allow_nonfinite: bool = False,
                                convert_to_lora: bool = False) -> Path:
    """consolidate() a sharded checkpoint (any TP/PP) and export it with `export_peft` (hf_config
    None: the base model the checkpoint records)."""
    return export_peft(ckpt_dir, out_dir, hf_config, adapter_name=adapter_name,
                       base_model_name_or_path=base_model_name_or_path, dtype=dtype, overwrite=overwrite,
                       allow_nonfinite=allow_nonfinite, convert_to_lora=convert_to_lora)
