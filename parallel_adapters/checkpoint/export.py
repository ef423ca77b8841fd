"""Export adapters as a Hugging Face PEFT adapter: `adapter_model.safetensors` + `adapter_config.json`.

Offline and single-process (no megatron, no torch.distributed).  From full factors under
Megatron names (from a checkpoint: read one module at a time, `plan_hf_factors` fixing the file's
header from the shapes first), per adapted Megatron module (A [r, in], B [out, r]):

    linear_qkv  -> q_proj, k_proj, v_proj   the same A for all three, B split per query group
                                            [q_g; k_g; v_g] (gathered rows: one copy)
    linear_fc1  -> gate_proj, up_proj       the same A for both, B split into the [gate; up] halves
                                            (row views, no copy)
    linear_proj -> o_proj                   as is
    linear_fc2  -> down_proj                as is

The factors are not copied where they need not be (they may share memory with the input tensors
and with each other): the file is written straight from their memory, one A three times for q/k/v.

Keys are `base_model.model.<HF module>.lora_A.weight` (PEFT inserts the adapter name itself; any
other prefix only warns "missing adapter keys" and leaves B at zero).  Per-module ranks and alphas
that differ from the most common ones go into `rank_pattern` / `alpha_pattern` keyed by full HF
module paths.  The same per-HF-module factors and scalings drive the offline merge (merge.py).
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from parallel_adapters.checkpoint.files import SafetensorsWriter, write_json
from parallel_adapters.checkpoint.finite import ALLOW_FLAG, check_config, check_tensor, delta_is_finite
from parallel_adapters.checkpoint.outputs import (
    StagedDirectory, check_inputs_apart, check_output_dir, checkpoint_inputs,
)
from parallel_adapters.config import lora_scaling, pattern_value
from parallel_adapters.user_errors import UserError
from parallel_adapters.hf.config import LlamaShape, read_hf_config
from parallel_adapters.hf.mapping import HF_LINEAR_NAMES, hf_modules, row_segments, split_rows

ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
_FACTOR_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_IN_FEATURES = {"linear_qkv": "hidden", "linear_fc1": "hidden", "linear_proj": "attn", "linear_fc2": "ffn"}


@dataclass(frozen=True)
class HFLoraFactor:
    """One HF module's adapter: W += scaling * B @ A."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    r: int
    alpha: float
    scaling: float


def group_factors(tensors: Mapping[str, torch.Tensor], adapter_name: str | None = None) -> dict[str, tuple[str, str]]:
    """Megatron module -> the keys of its (A, B) in `tensors`, for one adapter (the tensors may be
    on the meta device: only names and shapes are read).  ValueError on anything else."""
    found: dict[str, dict[str, str]] = {}
    adapters = set()
    for key, tensor in tensors.items():
        m = _FACTOR_KEY.match(key)
        if m is None:
            raise ValueError(f"cannot export {key!r} to PEFT format: only lora_A / lora_B factors are supported")
        adapter = m.group("adapter") or "default"
        adapters.add(adapter)
        if adapter_name is None or adapter == adapter_name:
            found.setdefault(m.group("module"), {})[m.group("factor")] = key
    if adapter_name is None and len(adapters) > 1:
        raise ValueError(f"the tensors hold adapters {sorted(adapters)}: pass adapter_name")
    if not found:
        raise ValueError(f"no factors of adapter {adapter_name!r} (have {sorted(adapters)})")
    out = {}
    for module, pair in sorted(found.items()):
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{module}: lora_{'B' if 'A' in pair else 'A'} is missing")
        a, b = (tuple(tensors[pair[f]].shape) for f in "AB")
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise ValueError(f"{module}: A {a} and B {b} are not [r, in] and [out, r]")
        out[module] = (pair["A"], pair["B"])
    return out


@dataclass(frozen=True)
class ModulePlan:
    """How one Megatron module's adapter becomes its HF modules' factors (no tensor data)."""

    module: str
    a_key: str
    b_key: str
    r: int
    alpha: float
    scaling: float
    in_features: int
    segments: tuple  # row segments of B (hf.mapping.Segment), HF module names without suffix
    hf_modules: tuple[str, ...]

    def factors(self, a: torch.Tensor, b: torch.Tensor) -> dict[str, HFLoraFactor]:
        """HF module -> its factors: A shared (the same tensor), B split by rows (views where
        contiguous, one gather for q/k/v)."""
        b_parts = split_rows(self.segments, b.detach(), copy=False)
        return {hf: HFLoraFactor(a.detach(), b_parts[hf], self.r, self.alpha, self.scaling) for hf in self.hf_modules}


def _expected_in(kind: str, shape: LlamaShape) -> int:
    return {"hidden": shape.hidden_size, "attn": shape.num_heads * shape.head_dim,
            "ffn": shape.intermediate_size}[kind]


def plan_hf_factors(tensors: Mapping[str, torch.Tensor], adapter_config: Mapping[str, Any],
                    hf_config: Mapping[str, Any], adapter_name: str | None = None) -> list[ModulePlan]:
    """The per-module export plan from the factors' names and shapes alone (meta tensors will do).

    `adapter_config` is the checkpoint's config (LoraConfig fields: lora_alpha, alpha_pattern,
    use_rslora); r is each module's A rows (EVA may have changed it)."""
    shape = LlamaShape.from_config(hf_config, "hf_config")
    alpha0 = adapter_config.get("lora_alpha", 8)
    alpha_pattern = adapter_config.get("alpha_pattern") or {}
    rslora = bool(adapter_config.get("use_rslora", False))
    plans = []
    for module, (a_key, b_key) in group_factors(tensors, adapter_name).items():
        a, b = tuple(tensors[a_key].shape), tuple(tensors[b_key].shape)
        leaf = module.rsplit(".", 1)[-1]
        if leaf not in HF_LINEAR_NAMES:
            raise ValueError(f"cannot export the adapter on {module!r}: PEFT export supports "
                             f"{sorted(HF_LINEAR_NAMES)} only")
        r, in_features = a
        if in_features != _expected_in(_IN_FEATURES[leaf], shape):
            raise ValueError(f"{module}: lora_A has {in_features} input features, the HF config implies "
                             f"{_expected_in(_IN_FEATURES[leaf], shape)}")
        alpha = pattern_value(module, alpha_pattern, alpha0)
        plans.append(ModulePlan(module, a_key, b_key, r, alpha, lora_scaling(alpha, r, rslora),
                                in_features, tuple(row_segments(module, shape, b[0], "")),
                                tuple(hf_modules(module, shape))))
    return plans


def hf_lora_factors(tensors: Mapping[str, torch.Tensor], adapter_config: Mapping[str, Any],
                    hf_config: Mapping[str, Any], adapter_name: str | None = None) -> dict[str, HFLoraFactor]:
    """HF module path -> its factors and scaling, from full factors under Megatron names."""
    out: dict[str, HFLoraFactor] = {}
    for plan in plan_hf_factors(tensors, adapter_config, hf_config, adapter_name):
        out.update(plan.factors(tensors[plan.a_key], tensors[plan.b_key]))
    return out


def _most_common(values: list) -> Any:
    return Counter(values).most_common(1)[0][0]


def peft_adapter_config(factors: Mapping[str, HFLoraFactor], adapter_config: Mapping[str, Any],
                        hf_config: Mapping[str, Any], base_model_name_or_path: str | None = None) -> dict:
    """adapter_config.json for PEFT: global r / lora_alpha plus patterns for the exceptions."""
    shape = LlamaShape.from_config(hf_config, "hf_config")
    r0 = _most_common([f.r for f in factors.values()])
    alpha0 = _most_common([f.alpha for f in factors.values()])
    types = sorted({m.rsplit(".", 1)[-1] for m in factors})
    complete = all(f"model.layers.{n}.{'self_attn' if t in ('q_proj', 'k_proj', 'v_proj', 'o_proj') else 'mlp'}.{t}"
                   in factors for n in range(shape.num_layers) for t in types)
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or adapter_config.get("base_model_name_or_path"),
        "r": r0, "lora_alpha": alpha0,
        "target_modules": types if complete else sorted(factors),
        "rank_pattern": {m: f.r for m, f in sorted(factors.items()) if f.r != r0},
        "alpha_pattern": {m: f.alpha for m, f in sorted(factors.items()) if f.alpha != alpha0},
        "use_rslora": bool(adapter_config.get("use_rslora", False)),
        "lora_dropout": float(adapter_config.get("lora_dropout", 0.0)),
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "use_dora": False, "revision": None,
    }


def peft_tensors(factors: Mapping[str, HFLoraFactor], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The adapter_model.safetensors dict: the factors as they are, cast to `dtype`.  Values may
    share memory (q/k/v hold one A); the project's safetensors writers write each value's own bytes, so nothing
    is copied for that (safetensors' own save_file would refuse them)."""
    out = {}
    for module, f in sorted(factors.items()):
        out[f"{PEFT_PREFIX}{module}.lora_A.weight"] = f.lora_A.detach().to(dtype or f.lora_A.dtype)
        out[f"{PEFT_PREFIX}{module}.lora_B.weight"] = f.lora_B.detach().to(dtype or f.lora_B.dtype)
    return out


def export_peft(source: str | Path | Mapping[str, torch.Tensor], out_dir: str | Path,
                hf_config: str | Path | Mapping[str, Any] | None, adapter_config: Mapping[str, Any] | None = None, *,
                adapter_name: str | None = None, base_model_name_or_path: str | None = None,
                dtype: torch.dtype | None = None, overwrite: bool = False, allow_nonfinite: bool = False) -> Path:
    """Write a PEFT adapter directory.

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
    delta scaling * B @ A that overflows `dtype`, are refused unless `allow_nonfinite`."""
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
    options = _ExportOptions(adapter_name, base_model_name_or_path, dtype, allow_nonfinite)
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


def _write_export(meta: Mapping[str, torch.Tensor], read: Callable[[str], torch.Tensor],
                  adapter_config: Mapping[str, Any] | None, hf_cfg: Mapping[str, Any], tmp: Path,
                  options: _ExportOptions) -> None:
    """adapter_model.safetensors and adapter_config.json into `tmp`, one Megatron module at a time.
    The file's header and the config come from the same plan run on `meta` (the factors on the meta
    device), so memory holds one module's factors."""
    if hasattr(adapter_config, "to_dict"):
        adapter_config = adapter_config.to_dict()
    check_config(adapter_config, "export: the adapter config", options.allow_nonfinite)
    plans = plan_hf_factors(meta, adapter_config, hf_cfg, options.adapter_name)
    per_module = [plan.factors(meta[plan.a_key], meta[plan.b_key]) for plan in plans]
    config = peft_adapter_config({hf: f for part in per_module for hf, f in part.items()}, adapter_config, hf_cfg,
                                 options.base_model_name_or_path)
    layout = [(n, t.dtype, tuple(t.shape)) for part in per_module
              for n, t in peft_tensors(part, options.dtype).items()]
    writer = SafetensorsWriter(tmp / ADAPTER_WEIGHTS_FILE, layout, metadata={"format": "pt"}, checksum=False)
    try:
        for plan in plans:
            a, b = read(plan.a_key), read(plan.b_key)
            _check_factors(plan, a, b, options)
            for name, tensor in peft_tensors(plan.factors(a, b), options.dtype).items():
                writer.write(name, tensor)
        writer.close()
    except BaseException:
        writer.discard()
        raise
    write_json(tmp / ADAPTER_CONFIG_FILE, config)


def _check_factors(plan: ModulePlan, a: torch.Tensor, b: torch.Tensor, options: _ExportOptions) -> None:
    """The factors are finite, and so is the delta they add to the base in the exported dtype."""
    if options.allow_nonfinite:
        return
    check_tensor(plan.a_key, a, "export")
    check_tensor(plan.b_key, b, "export")
    dtype = options.dtype or a.dtype
    if not delta_is_finite(a, b, plan.scaling, dtype):
        raise UserError(f"export: {plan.module}: scaling * B @ A overflows {str(dtype).replace('torch.', '')} "
                        f"(scaling {plan.scaling}); refusing it (pass {ALLOW_FLAG} to write it anyway)")


def load_checkpoint_factors(ckpt_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(full factors under Megatron names, the checkpoint's adapter config), verified by the reader."""
    from parallel_adapters.checkpoint.consolidate import consolidate_from
    from parallel_adapters.checkpoint.reader import CheckpointReader

    with CheckpointReader(ckpt_dir) as reader:
        return consolidate_from(reader), reader.config()


def export_peft_from_checkpoint(ckpt_dir: str | Path, out_dir: str | Path,
                                hf_config: str | Path | Mapping[str, Any] | None = None, *, adapter_name: str | None = None,
                                base_model_name_or_path: str | None = None, dtype: torch.dtype | None = None,
                                overwrite: bool = False, allow_nonfinite: bool = False) -> Path:
    """consolidate() a sharded checkpoint (any TP/PP) and export it with `export_peft` (hf_config
    None: the base model the checkpoint records)."""
    return export_peft(ckpt_dir, out_dir, hf_config, adapter_name=adapter_name,
                       base_model_name_or_path=base_model_name_or_path, dtype=dtype, overwrite=overwrite,
                       allow_nonfinite=allow_nonfinite)
