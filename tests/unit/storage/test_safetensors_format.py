"""storage/safetensors_format.py: dtype names, and the header against safetensors' own reader."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from parallel_adapters.storage.errors import CheckpointError
from parallel_adapters.storage.safetensors_format import DTYPES, dtype_name, safetensors_header


def test_dtype_names_round_trip_and_refuse_unknown():
    for name, dtype in DTYPES.items():
        assert dtype_name(dtype) == name
    with pytest.raises(CheckpointError, match="complex64"):
        dtype_name(torch.complex64)


def test_header_plus_raw_bytes_is_a_file_safetensors_reads(tmp_path):
    tensors = {"b": torch.arange(6, dtype=torch.float64).reshape(2, 3), "a": torch.tensor([True, False, True]),
               "c": torch.arange(5, dtype=torch.bfloat16)}
    head = safetensors_header([(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], {"format": "pt"})
    assert len(head) % 8 == 0
    body = b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in tensors.values())
    (tmp_path / "x.safetensors").write_bytes(head + body)
    loaded = load_file(tmp_path / "x.safetensors")
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[n], t) for n, t in tensors.items())
    with pytest.raises(CheckpointError, match="listed twice"):
        safetensors_header([("a", torch.float32, (1,)), ("a", torch.float32, (1,))])
