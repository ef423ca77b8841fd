"""The safetensors format as we write it: dtype names (as the checkpoint index records them), their
safetensors codes, and the header of a file whose tensors are written one at a time."""
from __future__ import annotations

import json
import math
import struct
from typing import Any, Iterable, Mapping

import torch

from parallel_adapters.storage.errors import CheckpointError

# Index dtype name <-> torch dtype <-> safetensors header code.
DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
    "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32, "int16": torch.int16,
    "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}
SAFETENSORS_CODES: dict[str, str] = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
    "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}


def dtype_name(dtype: torch.dtype) -> str:
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    raise CheckpointError(f"dtype {dtype} cannot be stored in a checkpoint (supported: {sorted(DTYPES)})")


def safetensors_header(layout: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
                       metadata: Mapping[str, str] | None = None) -> bytes:
    """The 8-byte length + JSON header of a safetensors file holding `layout`'s tensors in order."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape in layout:
        if name in header:
            raise CheckpointError(f"tensor {name!r} listed twice")
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": SAFETENSORS_CODES[dtype_name(dtype)], "shape": [int(s) for s in shape],
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors aligns the data section to 8 bytes
    return struct.pack("<Q", len(blob)) + blob
