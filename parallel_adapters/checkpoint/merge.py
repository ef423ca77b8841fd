"""Offline merge: fold an adapter into a Hugging Face base checkpoint, streaming.

Per HF module, by the kind's own rule (`AdapterKind.merged_weight`; LoRA: W + scaling * B @ A,
accumulated in float32 or wider and cast back to W's dtype), with the HF-named adapters of the
PEFT export (`hf_adapter.hf_module_adapters`: q/k/v and gate/up come from the same row split as
the exported adapter), or read back from an exported PEFT adapter directory.  The base is opened lazily and read one tensor at a time; output
shards are planned up front and written as we go, so memory stays at about one tensor.  The result
is written into a hidden sibling directory and renamed into place when complete.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from parallel_adapters.adapters.kinds import kind_for_stored_config
from parallel_adapters.checkpoint.base_model import BASE_FLAG, BASE_PATH_KEY, merge_base
from parallel_adapters.checkpoint.decomposition_export import convert_view, initial_names
from parallel_adapters.checkpoint.export import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, load_checkpoint_factors
from parallel_adapters.checkpoint.export_prompt import refuse_merge
from parallel_adapters.checkpoint.export_prefix import refuse_merge as refuse_prefix_merge
from parallel_adapters.checkpoint.hf_adapter import PEFT_PREFIX, HFModuleAdapter, hf_module_adapters
from parallel_adapters.checkpoint.files import read_json
from parallel_adapters.checkpoint.finite import check_config, check_tensor
from parallel_adapters.checkpoint.layout import CheckpointError
from parallel_adapters.checkpoint.loftq_merge import is_loftq, loftq_module_adapters
from parallel_adapters.checkpoint.outputs import StagedDirectory, check_output_dir, checkpoint_inputs
from parallel_adapters.hf.config import read_hf_config
from parallel_adapters.hf.files import (
    DEFAULT_MAX_SHARD_BYTES, HFCheckpoint, ShardedSafetensorsWriter, copy_side_files, plan_shards,
    shard_file_names, tensor_nbytes, write_weight_index,
)
from parallel_adapters.user_errors import UserError

_CODES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


def peft_adapters(peft_dir: str | Path, allow_nonfinite: bool = False) -> dict[str, HFModuleAdapter]:
    """HF module -> its adapter, read from a PEFT adapter directory (any registered kind)."""
    peft_dir = Path(peft_dir)
    config = read_json(peft_dir / ADAPTER_CONFIG_FILE, "PEFT adapter config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{peft_dir / ADAPTER_CONFIG_FILE}: expected a JSON object")
    check_config(config, f"merge: {peft_dir / ADAPTER_CONFIG_FILE}", allow_nonfinite)
    if config.get("target_parameters"):
        raise CheckpointError(f"{peft_dir}: adapters on fused expert parameters (target_parameters) merge from the "
                              "sharded checkpoint they were exported from: pass its directory instead")
    refuse_merge(config, peft_dir)
    refuse_prefix_merge(config, peft_dir)
    try:
        kind = kind_for_stored_config(config)
    except ValueError as exc:
        raise CheckpointError(f"{peft_dir}: {exc}") from None
    by_key = {kind.peft_key(name): name for name in kind.tensor_axes}
    pattern = re.compile(rf"^{re.escape(PEFT_PREFIX)}(?P<module>.+)\.(?P<key>{'|'.join(map(re.escape, by_key))})$")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    weights = peft_dir / ADAPTER_WEIGHTS_FILE
    try:
        with safe_open(str(weights), framework="pt") as fh:
            for key in fh.keys():
                m = pattern.match(key)
                if m is None:
                    raise CheckpointError(f"{weights}: {key!r} is not a tensor of a {kind.name} adapter")
                modules.setdefault(m.group("module"), {})[by_key[m.group("key")]] = fh.get_tensor(key)
    except SafetensorError as exc:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({exc})") from None
    out = {}
    for module, tensors in modules.items():
        try:
            hparams = kind.peft_hparams(config, module, {n: tuple(t.shape) for n, t in tensors.items()})
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"{peft_dir}: {module}: {exc}") from None
        out[module] = HFModuleAdapter(kind, tensors, hparams, embedding=module.endswith("embed_tokens"))
    return out


def merge_into_hf(source: str | Path, base_hf_dir: str | Path | None, out_dir: str | Path,
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, *, adapter_name: str | None = None,
                  progress: bool = True, overwrite: bool = False, allow_nonfinite: bool = False,
                  safe_merge: bool = False) -> Path:
    """Write `base_hf_dir` with the adapter folded in to `out_dir`.

    `source`: a sharded adapter checkpoint directory (index.json) or an exported PEFT adapter
    directory (adapter_model.safetensors).  `base_hf_dir` None: the base the source records (a
    checkpoint's base_model_name_or_path, checkpoint/base_model.py, or the PEFT adapter's).
    Output: `model.safetensors`, or shards of at most `max_shard_bytes` +
    `model.safetensors.index.json`; config, generation config and tokenizer files are copied
    unchanged.  `out_dir` is checked before anything is read beyond the source's config
    (`outputs.check_output_dir`: new or empty, or a previous merge with `overwrite`; never an
    input).  NaN/inf factors or config values are refused unless `allow_nonfinite`; `safe_merge`
    also checks every merged weight before it is written."""
    source = Path(source)
    is_peft = (source / ADAPTER_WEIGHTS_FILE).is_file()
    if base_hf_dir is None:
        base_hf_dir = _recorded_peft_base(source) if is_peft else _recorded_checkpoint_base(source)
    inputs = [("PEFT adapter", source)] if is_peft else checkpoint_inputs(source)
    out = check_output_dir(out_dir, "merge", [*inputs, ("Hugging Face base", base_hf_dir)], overwrite)
    if is_peft:
        adapters = peft_adapters(source, allow_nonfinite)
    else:
        tensors, config = load_checkpoint_factors(source)
        check_config(config, f"merge: {source}", allow_nonfinite)
        loftq = bool(initial_names(tensors)) and is_loftq(config)  # into its de-quantised base, Q + s B A
        if initial_names(tensors) and not loftq:  # PiSSA/OLoRA: into the original base as W + s B A - s B0 A0
            meta, read, config = convert_view(tensors, tensors.__getitem__, config, True, "merge")
            tensors = {n: read(n) for n in meta}
        refuse_merge(config, source)
        refuse_prefix_merge(config, source)
        build = loftq_module_adapters if loftq else hf_module_adapters
        adapters = build(tensors, config, read_hf_config(base_hf_dir), adapter_name)
    if not allow_nonfinite:
        for module, adapter in adapters.items():
            for name, tensor in adapter.tensors.items():
                check_tensor(f"{module}.{name}", tensor, f"merge: {source}")
    return merge_adapters_into_hf(adapters, base_hf_dir, out, max_shard_bytes, progress,
                                  check_finite=safe_merge and not allow_nonfinite)


def _recorded_checkpoint_base(source: Path) -> Path:
    from parallel_adapters.checkpoint.reader import CheckpointReader

    with CheckpointReader(source) as reader:
        return merge_base(reader)


def _recorded_peft_base(peft_dir: Path) -> Path:
    """A PEFT adapter's base_model_name_or_path, when it is a local HF directory."""
    config = read_json(peft_dir / ADAPTER_CONFIG_FILE, "PEFT adapter config")
    path = config.get(BASE_PATH_KEY) if isinstance(config, dict) else None
    if not isinstance(path, str) or not (Path(path) / "config.json").is_file():
        raise UserError(f"{peft_dir / ADAPTER_CONFIG_FILE}: base_model_name_or_path {path!r} is not a local HF "
                        f"directory: pass {BASE_FLAG} with the base model's HF directory")
    return Path(path)


def _check_targets(base: HFCheckpoint, adapters: Mapping[str, HFModuleAdapter]) -> None:
    tied = bool(read_hf_config(base.directory).get("tie_word_embeddings")) and any(
        m.rsplit(".", 1)[-1] in ("embed_tokens", "lm_head") for m in adapters)
    if tied:
        raise CheckpointError(
            f"{base.directory} ties lm_head to embed_tokens, and the adapter targets one of them: a merge would "
            "change both (PEFT merges into the shared table anyway and warns). Untie the base first, or load "
            "the adapter with PEFT unmerged.")
    problems = []
    for module, adapter in adapters.items():
        name = module + ".weight"
        if name not in base.weight_map:
            problems.append(f"{name}: not in the base checkpoint")
            continue
        for tensor_name, tensor in adapter.tensors.items():
            for axis, size in zip(adapter.kind.axes(tensor_name, adapter.embedding, adapter.hparams), base.shape(name)):
                if axis is not None and tensor.shape[axis] != size:
                    problems.append(f"{name}: base shape {base.shape(name)}, adapter {tensor_name} "
                                    f"{tuple(tensor.shape)}")
    if problems:
        raise CheckpointError(f"the adapter does not fit {base.directory}:\n    " + "\n    ".join(problems))


def merge_adapters_into_hf(adapters: Mapping[str, HFModuleAdapter], base_hf_dir: str | Path, out_dir: str | Path,
                           max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = True,
                           check_finite: bool = False) -> Path:
    """Stream every base tensor to `out_dir` (already checked by the caller, see `merge_into_hf`),
    folding in the adapter where one targets it; `check_finite`: refuse a merged weight with
    NaN/inf (the output is then not written)."""
    base = HFCheckpoint(base_hf_dir)
    _check_targets(base, adapters)
    out = Path(out_dir).absolute()
    names = sorted(base.names(), key=lambda n: (base.weight_map[n], n))  # file by file: sequential reads
    layout = [(n, _CODES[base.dtype_code(n)], base.shape(n)) for n in names]
    shards = plan_shards(layout, max_shard_bytes)
    files = shard_file_names(len(shards))
    with StagedDirectory(out, "merge") as tmp:
        writer = ShardedSafetensorsWriter(tmp, layout, shards, files)
        for name in tqdm(names, desc="merge", disable=not progress, leave=False):
            weight = base.read(name)
            adapter = adapters.get(name.removesuffix(".weight")) if name.endswith(".weight") else None
            if adapter is not None:
                weight = adapter.merged_weight(weight)
                if check_finite:
                    check_tensor(name, weight, "merge --safe-merge: the merged weight")
            elif name.endswith(".bias") and name.removesuffix(".bias") in adapters:  # IA3 scales it
                module = name.removesuffix(".bias")
                weight = adapters[module].merged_bias(base.read(module + ".weight"), weight)
            writer.write(name, weight)
        writer.close()
        if len(files) > 1:
            write_weight_index(tmp, writer.weight_map, sum(tensor_nbytes(d, s) for _, d, s in layout))
        copy_side_files(base_hf_dir, tmp)
    return out
