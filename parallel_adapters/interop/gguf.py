"""A GGUF Llama (quantised or not) as an ordinary Hugging Face checkpoint that the rest of the
package can import: transformers (with the `gguf` package) de-quantises the tensors and rebuilds
the tokenizer; the result is written with `save_pretrained`, without the GGUF quantisation entry in
config.json (the tensors written are plain floats).

    convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "runs/smollm2-hf")

The output directory is written whole under a temporary sibling name and renamed into place, with
`gguf_source.json` naming the file it came from: a later call with the same GGUF file returns the
directory as it is (a cache), a different file is refused rather than overwritten.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

SOURCE_RECORD = "gguf_source.json"


def _source(gguf_file: Path) -> dict:
    stat = gguf_file.stat()
    return {"file": gguf_file.name, "bytes": stat.st_size}


def convert_gguf(gguf_file: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """The HF checkpoint (safetensors, config.json, tokenizer) of `gguf_file` in `out_dir`, converted
    now or found from an earlier conversion of the same file.  ValueError naming the path when the
    GGUF file is missing or `out_dir` holds something else."""
    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    if not gguf_file.is_file():
        raise ValueError(f"GGUF file {str(gguf_file)!r} does not exist")
    record = out_dir / SOURCE_RECORD
    if record.is_file():
        found = json.loads(record.read_text())
        if found != _source(gguf_file):
            raise ValueError(f"{out_dir} holds a conversion of {found.get('file')!r}, not of {gguf_file.name!r}; "
                             "remove it or choose another directory")
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} is not an empty directory and holds no {SOURCE_RECORD}")
    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _convert(gguf_file, tmp, dtype)
        (tmp / SOURCE_RECORD).write_text(json.dumps(_source(gguf_file), indent=2) + "\n")
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _convert(gguf_file: Path, out_dir: Path, dtype: torch.dtype) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = dict(pretrained_model_name_or_path=str(gguf_file.parent), gguf_file=gguf_file.name)
    tokenizer = AutoTokenizer.from_pretrained(**where)
    model = AutoModelForCausalLM.from_pretrained(**where, dtype=dtype)
    # The tensors are de-quantised: what is written is a plain checkpoint, and a quantization_config
    # left in config.json would send every later loader looking for a GGUF file.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
