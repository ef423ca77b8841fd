"""consolidate.py: shards -> full tensors, reshard to another TP size, the streaming writer."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from parallel_adapters.checkpoint.consolidate import (
    consolidate, iter_full_tensors, reshard,
)
from parallel_adapters.checkpoint.files import SafetensorsWriter
from parallel_adapters.user_errors import UserError
from parallel_adapters.checkpoint.layout import CheckpointError, replica_owners, validate_index
from parallel_adapters.checkpoint.sharded import load_sharded
from parallel_adapters.distributed.groups import ParallelGroups
from tests.distributed.checkpoint_jobs import (
    corrupt_last_byte,
    CONFIG, LAYOUT, REPLICATED_NAME, expected, full_tensors, sharded, write_emulated_checkpoint,
)

FC1_B = "decoder.layers.1.mlp.linear_fc1.lora_B.default.weight"


@pytest.fixture(scope="module")
def full():
    return full_tensors()


def _assert_equal(got, want):
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("tp_size, pp_size", [(1, 1), (2, 1), (4, 1), (2, 2)])
def test_consolidate_returns_full_tensors(tmp_path, full, tp_size, pp_size):
    ckpt = write_emulated_checkpoint(tmp_path / "c", full, tp_size, pp_size)
    _assert_equal(consolidate(ckpt), full)
    assert [n for n, _ in iter_full_tensors(ckpt)] == sorted(full)


def test_chunked_layout_is_not_a_contiguous_split(tmp_path, full):
    """fc1 B (chunks=2): rank 0 holds [gate_0; up_0]; a plain cat of the files would be wrong."""
    ckpt = write_emulated_checkpoint(tmp_path / "c", full, 2)
    pieces = [load_file(str(ckpt / "shards" / f"tp0{r}-pp00.safetensors"))[FC1_B] for r in range(2)]
    assert not torch.equal(torch.cat(pieces), full[FC1_B])
    assert torch.equal(consolidate(ckpt)[FC1_B], full[FC1_B])


@pytest.mark.parametrize("new_tp", [1, 4])
def test_reshard_tp2_then_load(tmp_path, full, new_tp):
    src = write_emulated_checkpoint(tmp_path / "tp2", full, 2)
    out = reshard(src, tmp_path / f"tp{new_tp}", new_tp, progress=False)
    index = json.loads((out / "index.json").read_text())
    validate_index(index)
    assert index["tp_size"] == new_tp
    assert sorted((out / "shards").iterdir()) == [out / "shards" / f"tp{r:02d}-pp00.safetensors" for r in range(new_tp)]
    replicated = [n for n, (_, spec, _) in LAYOUT.items() if spec.replicated]
    owners = replica_owners({n: full[n].numel() * full[n].element_size() for n in replicated}, new_tp)
    for name in replicated:  # stored once, where a save at new_tp would put it
        assert index["tensors"][name]["files"] == {f"tp{owners[name]:02d}-pp00": f"shards/tp{owners[name]:02d}-pp00.safetensors"}
    if new_tp > 1:
        assert len(set(owners.values())) == len(replicated) == 2  # spread over the writers
    assert json.loads((out / "adapter_config.json").read_text()) == CONFIG
    for rank in range(new_tp):
        got = load_sharded(out, ParallelGroups(tp_size=new_tp, tp_rank=rank), expected(full), collective=False)
        _assert_equal(got, {n: t.local for n, t in sharded(full, rank, new_tp).items()})
    _assert_equal(consolidate(out), full)
    assert (tmp_path / "latest").read_text() == "tp2\n"  # reshard publishes without touching `latest`


def test_reshard_keeps_pipeline_stages(tmp_path, full):
    src = write_emulated_checkpoint(tmp_path / "src", full, 2, pp_size=2)
    out = reshard(src, tmp_path / "out", 4, progress=False)
    index = json.loads((out / "index.json").read_text())
    assert index["pp_size"] == 2
    assert set(index["tensors"][FC1_B]["files"]) == {f"tp0{r}-pp01" for r in range(4)}
    _assert_equal(consolidate(out), full)


def test_reshard_to_indivisible_tp_fails_cleanly(tmp_path, full):
    src = write_emulated_checkpoint(tmp_path / "src", full, 2)
    with pytest.raises(CheckpointError, match="cannot be split over 3 TP ranks"):
        reshard(src, tmp_path / "out", 3, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "src"]  # no output, no temp dir


def test_reshard_refuses_bad_arguments(tmp_path, full):
    src = write_emulated_checkpoint(tmp_path / "src", full, 2)
    with pytest.raises(UserError, match="--out .* is the checkpoint"):
        reshard(src, src, 1)
    with pytest.raises(CheckpointError, match="positive int"):
        reshard(src, tmp_path / "o", 0)


def test_consolidate_verifies_checksums(tmp_path, full):
    src = write_emulated_checkpoint(tmp_path / "src", full, 2)
    path = src / "shards" / "tp00-pp00.safetensors"
    corrupt_last_byte(path)
    with pytest.raises(CheckpointError, match=r"tp00-pp00\.safetensors: sha256"):
        consolidate(src)


def test_streaming_writer_matches_save_file(tmp_path):
    tensors = {"a": torch.randn(3, 5, dtype=torch.float64), "b": torch.arange(7, dtype=torch.int32),
               "c": torch.randn(2, 2).to(torch.bfloat16), "d": torch.tensor([True, False, True]),
               "e": torch.zeros(0, 4), "s": torch.tensor(2.5)}
    w = SafetensorsWriter(tmp_path / "x.safetensors", [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()])
    for n, t in tensors.items():
        w.write(n, t)
    w.close()
    save_file(tensors, str(tmp_path / "ref.safetensors"))
    got = load_file(str(tmp_path / "x.safetensors"))
    _assert_equal(got, load_file(str(tmp_path / "ref.safetensors")))
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as fh:
        assert fh.get_slice("a")[:, 1:3].tolist() == tensors["a"][:, 1:3].tolist()


def test_streaming_writer_enforces_header_order_and_completeness(tmp_path):
    layout = [("a", torch.float32, (2,)), ("b", torch.float32, (3,))]
    w = SafetensorsWriter(tmp_path / "x.safetensors", layout)
    with pytest.raises(CheckpointError, match="header expects"):
        w.write("b", torch.zeros(3))
    with pytest.raises(CheckpointError, match="header expects"):
        w.write("a", torch.zeros(3))
    w.write("a", torch.zeros(2))
    with pytest.raises(CheckpointError, match="closed after 1 of 2 tensors"):
        w.close()


def test_layout_fixture_covers_every_spec_kind():
    specs = {spec for _, spec, _ in LAYOUT.values()}
    assert {s.dim for s in specs} == {None, 0, 1} and max(s.chunks for s in specs) == 2
