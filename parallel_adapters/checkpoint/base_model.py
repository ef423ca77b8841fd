"""What a checkpoint records about the base model its adapters were trained on, so that `export`
and `merge` need `--hf-config` / `--base` only to override it::

    <step>/hf_config.json       the base's HF config.json: a byte copy of the imported HF
                                checkpoint's, or one derived from the Megatron model (a run built
                                from GPT settings); listed in index.json like every file
    <step>/adapter_config.json  "base_model_name_or_path" (PEFT's field): the imported HF
                                directory, absolute; absent for a base built from GPT settings

A checkpoint saved before these were recorded has neither; the commands then ask for the flags.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from parallel_adapters.checkpoint.files import read_json, write_bytes_durable
from parallel_adapters.checkpoint.layout import HF_CONFIG_FILE, CheckpointError
from parallel_adapters.user_errors import UserError

BASE_PATH_KEY = "base_model_name_or_path"
HF_CONFIG_FLAG = "--hf-config"
BASE_FLAG = "--base"


@dataclass(frozen=True)
class BaseModel:
    """The record a save writes: hf_config.json's bytes and the HF directory (None: none)."""

    config_json: bytes
    name_or_path: str | None = None

    @classmethod
    def from_hf_dir(cls, hf_dir: str | Path) -> "BaseModel":
        """The imported HF checkpoint: its config.json copied byte for byte, its absolute path."""
        path = Path(hf_dir) / "config.json"
        try:
            data = path.read_bytes()
            parsed = json.loads(data)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: cannot record the base model's config ({exc})") from None
        if not isinstance(parsed, dict):
            raise ValueError(f"{path}: top level is not a JSON object")
        return cls(data, str(Path(hf_dir).absolute()))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "BaseModel":
        """A base without an HF checkpoint: the config.json that describes it (no weights to name)."""
        return cls((json.dumps(dict(config), indent=2, sort_keys=True) + "\n").encode("utf-8"))


def write_base_files(tmp_dir: Path, base: BaseModel | None) -> dict[str, dict]:
    """hf_config.json into a save's temporary directory; {relative path: record}."""
    if base is None:
        return {}
    return {HF_CONFIG_FILE: write_bytes_durable(tmp_dir / HF_CONFIG_FILE, base.config_json)}


def copy_base_files(reader: Any, tmp_dir: Path) -> dict[str, dict]:
    """The recorded hf_config.json of `reader`'s checkpoint (checksum-verified), copied into a
    reshard's temporary directory; {relative path: record}."""
    if HF_CONFIG_FILE not in reader.index["files"]:
        return {}
    data = reader.verified_path(HF_CONFIG_FILE).read_bytes()
    return {HF_CONFIG_FILE: write_bytes_durable(tmp_dir / HF_CONFIG_FILE, data)}


def recorded_hf_config(reader: Any) -> dict | None:
    """The checkpoint's hf_config.json (checksum-verified), or None if it records none."""
    if HF_CONFIG_FILE not in reader.index["files"]:
        return None
    config = read_json(reader.verified_path(HF_CONFIG_FILE), "the recorded base model config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{reader.directory / HF_CONFIG_FILE}: top level is not a JSON object")
    return config


def recorded_base_path(reader: Any) -> str | None:
    """The HF directory the checkpoint records as its base, or None."""
    path = reader.config().get(BASE_PATH_KEY)
    return path if isinstance(path, str) and path else None


def export_base(reader: Any) -> tuple[dict, str | None]:
    """(HF config, base_model_name_or_path) an export without `--hf-config` uses."""
    config = recorded_hf_config(reader)
    if config is None:
        raise UserError(f"{reader.directory} does not record its base model's config (it was saved before "
                        f"checkpoints did): pass {HF_CONFIG_FLAG} with the base model's HF directory or config.json")
    return config, recorded_base_path(reader)


def merge_base(reader: Any) -> Path:
    """The HF directory a merge without `--base` folds the adapter into: the recorded one."""
    path = recorded_base_path(reader)
    if path is None:
        if HF_CONFIG_FILE in reader.index["files"]:
            raise UserError(f"{reader.directory} was trained on a base built from GPT settings, not imported from "
                            f"an HF checkpoint, so no base weights are recorded: pass {BASE_FLAG} with an HF "
                            "directory of that model (export.verify_with_peft writes one beside the PEFT export)")
        raise UserError(f"{reader.directory} does not record its base model (it was saved before checkpoints "
                        f"did): pass {BASE_FLAG} with the base model's HF directory")
    if not (Path(path) / "config.json").is_file():
        raise UserError(f"{reader.directory} was trained on the base {path}, which no longer exists (no "
                        f"config.json there): pass {BASE_FLAG} with the base model's HF directory")
    return Path(path)
