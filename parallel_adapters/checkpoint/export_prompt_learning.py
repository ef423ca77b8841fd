"""What the PEFT exports of the model-level adapters (prompt tuning, P-tuning, prefix tuning:
PEFT's prompt learning) share: picking one adapter's tensors out of the checkpoint's, reading
them with the finite check, and writing PEFT's two files (one `prompt_embeddings` tensor)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from parallel_adapters.checkpoint.files import write_json, write_safetensors
from parallel_adapters.checkpoint.finite import check_tensor


def adapter_keys(names: list[str], adapter_name: str | None, pattern: re.Pattern, kind: str, form: str,
                 noun: str, nouns: str) -> dict[str, str]:
    """{tensor name under the adapter: checkpoint key} of the one adapter to export.  `pattern`
    matches every key with groups `adapter` and `tensor`; the errors speak of a `kind` tensor
    (written `form`) and of the `noun` / `nouns` of the adapters found."""
    found: dict[str, dict[str, str]] = {}
    for key in names:
        m = pattern.match(key)
        if m is None:
            raise ValueError(f"cannot export {key!r}: not a {kind} tensor ({form})")
        found.setdefault(m.group("adapter"), {})[m.group("tensor")] = key
    if adapter_name is not None:
        if adapter_name not in found:
            raise ValueError(f"no {noun} of adapter {adapter_name!r} (have {sorted(found)})")
        return found[adapter_name]
    if len(found) != 1:
        raise ValueError(f"the tensors hold {nouns} {sorted(found)}: pass adapter_name" if found
                         else f"no {kind} tensor to export")
    return next(iter(found.values()))


def read_checked(keys: Mapping[str, str], read: Callable[[str], torch.Tensor],
                 allow_nonfinite: bool) -> dict[str, torch.Tensor]:
    """{tensor name: tensor} read (detached), each checked finite unless `allow_nonfinite`."""
    tensors = {name: read(key).detach() for name, key in keys.items()}
    if not allow_nonfinite:
        for name, tensor in tensors.items():
            check_tensor(keys[name], tensor, "export")
    return tensors


def write_peft_files(tmp: Path, weights_file: str, config_file: str, key: str, tensor: torch.Tensor,
                     config: Mapping[str, Any]) -> None:
    """PEFT's adapter_model.safetensors ({key: tensor}) and adapter_config.json into `tmp`."""
    write_safetensors(tmp / weights_file, {key: tensor}, metadata={"format": "pt"}, checksum=False)
    write_json(tmp / config_file, config)
