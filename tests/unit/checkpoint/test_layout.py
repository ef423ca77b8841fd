"""layout.py: names, index schema validation, durable writes (pure, one process)."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from parallel_adapters.checkpoint.layout import (
    FORMAT_VERSION, CheckpointError, build_index, optim_files, parse_shard_key, rank_key, rng_file, shard_file,
    shard_key, tmp_dir_for, validate_index
)
from parallel_adapters.checkpoint.files import write_json, write_text_atomic

SHA = "0" * 64
NAME = "decoder.layers.0.self_attention.linear_qkv.lora_B.default.weight"


def _index(tp_size: int = 2) -> dict:
    files = {shard_file(t, 0): {"sha256": SHA, "bytes": 10} for t in range(tp_size)}
    files["adapter_config.json"] = {"sha256": SHA, "bytes": 2}
    tensors = {
        NAME: {"global_shape": [8, 4], "dtype": "float64", "shard": {"dim": 0, "chunks": 1},
               "files": {shard_key(t, 0): shard_file(t, 0) for t in range(tp_size)}},
        "rep": {"global_shape": [4], "dtype": "bfloat16", "shard": {"dim": None, "chunks": 1},
                "files": {"tp00-pp00": shard_file(0, 0)}},
    }
    return build_index(tp_size, 1, 1, tensors, files)


def test_names_are_zero_padded_and_parse_back():
    assert shard_key(3, 1) == "tp03-pp01"
    assert shard_file(0, 12) == "shards/tp00-pp12.safetensors"
    assert rank_key(1, 2, 3) == "tp01-pp02-dp03"
    assert optim_files(1, 0, 2) == ("train_state/optim-tp01-pp00-dp02.safetensors",
                                    "train_state/optim-tp01-pp00-dp02.json")
    assert rng_file(0, 0, 1) == "train_state/rng-tp00-pp00-dp01.safetensors"
    assert parse_shard_key("tp12-pp03") == (12, 3)
    for bad in ("tp1", "tp01-pp02-dp00", "x", 5):
        with pytest.raises(CheckpointError, match="bad shard key"):
            parse_shard_key(bad)


def test_tmp_dir_is_a_hidden_sibling(tmp_path):
    tmp = tmp_dir_for(tmp_path / "step-3", "abc")
    assert tmp == tmp_path / ".step-3.tmp-abc"
    assert tmp_dir_for(tmp_path / "s") != tmp_dir_for(tmp_path / "s")  # random token


def test_valid_index_parses():
    infos = validate_index(_index())
    assert infos[NAME].files == {0: "shards/tp00-pp00.safetensors", 1: "shards/tp01-pp00.safetensors"}
    assert infos[NAME].local_shape(2) == (4, 4)
    assert infos["rep"].dtype == torch.bfloat16 and infos["rep"].spec.replicated
    assert _index()["format_version"] == FORMAT_VERSION == 2
    assert validate_index({**_index(), "format_version": 1})[NAME].files == infos[NAME].files  # v1 still reads


def test_replicated_tensor_may_live_in_any_one_tp_file():
    index = _corrupt(lambda i: i["tensors"]["rep"].update(files={"tp01-pp00": "shards/tp01-pp00.safetensors"}))
    assert validate_index(index)["rep"].replica_rank == 1
    assert validate_index(_index())["rep"].replica_rank == 0


def test_expert_split_size_overrides_tp_size():
    """A routed expert's tensor saved at expert-TP 1 under TP 2: one piece, read at split size 1."""
    def one_piece(i):
        i["tensors"][NAME].update(split_size=1)
        i["tensors"][NAME]["files"].pop("tp01-pp00")
    info = validate_index(_corrupt(one_piece))[NAME]
    assert (info.split_size, list(info.files)) == (1, [0])
    assert validate_index(_index())[NAME].split_size == 2


def _corrupt(mutate):
    index = copy.deepcopy(_index())
    mutate(index)
    return index


@pytest.mark.parametrize("mutate, message", [
    (lambda i: i.update(format_version=3), "unsupported format_version 3"),
    (lambda i: i.pop("format_version"), "unsupported format_version None"),
    (lambda i: i.update(tp_size=0), "tp_size must be a positive int"),
    (lambda i: i.update(extra=1), "keys"),
    (lambda i: i["tensors"][NAME].update(dtype="float128"), f"tensor '{NAME}': unsupported dtype"),
    (lambda i: i["tensors"][NAME].update(global_shape=[8, -4]), "global_shape"),
    (lambda i: i["tensors"][NAME].update(global_shape="8x4"), "global_shape"),
    (lambda i: i["tensors"][NAME].update(global_shape=[7, 4]), "bad shard spec"),
    (lambda i: i["tensors"][NAME].update(shard={"dim": 2, "chunks": 1}), "out of range"),
    (lambda i: i["tensors"][NAME].update(shard={"dim": 0, "stride": 2}), "unknown fields"),
    (lambda i: i["tensors"][NAME]["files"].pop("tp01-pp00"), "expected \\[0, 1\\]"),
    (lambda i: i["tensors"]["rep"]["files"].update({"tp01-pp00": "shards/tp01-pp00.safetensors"}), "stored once"),
    (lambda i: i["tensors"][NAME]["files"].update({"tp02-pp00": "shards/tp00-pp00.safetensors"}), "outside tp_size"),
    (lambda i: i["tensors"][NAME]["files"].update({"tp01-pp00": "../x.safetensors"}), "'\\.\\./x.safetensors'"),
    (lambda i: i["tensors"][NAME]["files"].update({"tp01-pp00": "shards/other.safetensors"}), "no checksum"),
    (lambda i: i["files"].update({"/abs/file": {"sha256": SHA, "bytes": 1}}), "absolute"),
    (lambda i: i["files"]["adapter_config.json"].update(sha256="xyz"), "sha256: hex64"),
    (lambda i: i["files"]["adapter_config.json"].update(bytes=-1), "adapter_config.json"),
    (lambda i: i["train_state"].update(rng={"tp00-pp00-dp00": "../rng"}), "rng state file"),
    (lambda i: i["train_state"].pop("rng"), "train_state must have keys"),
    (lambda i: i["tensors"][NAME].update(split_size=0), "split_size must be a positive int"),
    (lambda i: i["tensors"][NAME].update(split_size=1), "outside split_size 1"),  # files of 2 ranks
    (lambda i: i["tensors"][NAME].update(split_size=4), "expected \\[0, 1, 2, 3\\]"),
])
def test_index_validation_names_the_problem(mutate, message):
    with pytest.raises(CheckpointError, match=message):
        validate_index(_corrupt(mutate))


def test_tensor_held_by_two_stages_is_refused():
    def two_stages(i):
        i["pp_size"] = 2
        i["tensors"][NAME]["files"] = {"tp00-pp00": shard_file(0, 0), "tp01-pp01": shard_file(0, 0)}
    with pytest.raises(CheckpointError, match="several pipeline stages"):
        validate_index(_corrupt(two_stages))


def test_write_json_is_strict_and_durable(tmp_path):
    rec = write_json(tmp_path / "a.json", {"x": 1})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    assert rec["bytes"] == (tmp_path / "a.json").stat().st_size and len(rec["sha256"]) == 64
    with pytest.raises(CheckpointError, match="b.json"):
        write_json(tmp_path / "b.json", {"x": float("nan")})
    with pytest.raises(CheckpointError, match="c.json"):
        write_json(tmp_path / "c.json", {"x": object()})
    assert not (tmp_path / "b.json").exists() and not (tmp_path / "c.json").exists()


def test_write_text_atomic_replaces_and_leaves_no_temp(tmp_path):
    write_text_atomic(tmp_path / "latest", "a\n")
    write_text_atomic(tmp_path / "latest", "b\n")
    assert (tmp_path / "latest").read_text() == "b\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]
