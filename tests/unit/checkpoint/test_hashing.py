"""Checksums are computed once, by the writer, from the bytes it writes; loaders verify each file
once, while reading it; durability (fsync) is kept.  One process; multi-rank files are written
with the same writer functions one fake rank at a time (tests.distributed.checkpoint_jobs)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from parallel_adapters.checkpoint import files as files_mod, reader as reader_mod
from parallel_adapters.checkpoint.consolidate import consolidate, iter_full_tensors, reshard
from parallel_adapters.checkpoint.export import (
    ADAPTER_WEIGHTS_FILE, export_peft, export_peft_from_checkpoint, hf_module_adapters, peft_tensors,
)
from parallel_adapters.checkpoint.layout import CheckpointError, replica_owners
from parallel_adapters.checkpoint.outputs import OUTPUT_MARKER
from parallel_adapters.checkpoint.files import (
    SafetensorsWriter, file_record, fsync_together, write_json, write_safetensors
)
from parallel_adapters.checkpoint.sharded import load_sharded, save_sharded
from parallel_adapters.checkpoint.writer import (
    assemble_index, make_tmp_dir, publish, replica_digests, shard_file_order, tensor_digest, write_global_files,
    write_rank_files,
)
from parallel_adapters.distributed.groups import ParallelGroups
from parallel_adapters.distributed.sharding import ShardedTensor, ShardSpec
from tests.distributed.checkpoint_jobs import (
    corrupt_last_byte,
    CONFIG, REPLICATED_NAME, SPLIT_NAME, expected, full_tensors, sharded, write_emulated_checkpoint,
)

SINGLE = ParallelGroups.single()
ODD_TENSORS = {
    "f64": torch.randn(3, 5, dtype=torch.float64), "i32": torch.arange(7, dtype=torch.int32),
    "bf16": torch.randn(2, 2).to(torch.bfloat16), "bool": torch.tensor([True, False, True]),
    "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5), "u8": torch.arange(3, dtype=torch.uint8),
}


@pytest.fixture(scope="module")
def full():
    return full_tensors()


@pytest.fixture
def hashed_files(monkeypatch):
    """Every file the loader hashes (relative names), in order."""
    seen: list[str] = []
    real = files_mod.file_record

    def counting(path):
        seen.append(Path(path).name)
        return real(path)
    monkeypatch.setattr(reader_mod, "file_record", counting)
    return seen


def _no_file_hashing(monkeypatch):
    def refuse(path):
        raise AssertionError(f"{path} was read back and hashed")
    monkeypatch.setattr(files_mod, "file_record", refuse)
    monkeypatch.setattr(reader_mod, "file_record", refuse)


# ---- writers: the record is the hash of the bytes written ------------------------------------

def test_write_safetensors_record_is_the_file_on_disk(tmp_path):
    base = torch.randn(6, 4)
    tensors = {**ODD_TENSORS, "view": base[:3], "view_t": base.t(), "view_again": base[3:]}
    rec = write_safetensors(tmp_path / "x.safetensors", tensors)
    assert rec == file_record(tmp_path / "x.safetensors")
    got = load_file(str(tmp_path / "x.safetensors"))
    assert sorted(got) == sorted(tensors)
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


def test_write_safetensors_refuses_non_tensors_naming_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"y\.safetensors: 'a' is a list"):
        write_safetensors(tmp_path / "y.safetensors", {"a": [1]})


def test_write_safetensors_without_checksum_writes_shared_memory_once_per_tensor(tmp_path):
    a = torch.randn(4, 3)
    tensors = {"q": a, "k": a, "v": a[1:], "b": torch.arange(5, dtype=torch.int64)}
    rec = write_safetensors(tmp_path / "p.safetensors", tensors, metadata={"format": "pt"}, checksum=False)
    assert rec == {"bytes": (tmp_path / "p.safetensors").stat().st_size}
    with safe_open(str(tmp_path / "p.safetensors"), "pt") as fh:
        assert fh.metadata() == {"format": "pt"}
        assert all(torch.equal(fh.get_tensor(n), t) for n, t in tensors.items())


def test_streaming_writer_record_and_json_record(tmp_path):
    w = SafetensorsWriter(tmp_path / "s.safetensors", [(n, t.dtype, tuple(t.shape)) for n, t in ODD_TENSORS.items()])
    for n, t in ODD_TENSORS.items():
        w.write(n, t)
    assert w.close() == file_record(tmp_path / "s.safetensors")
    rec = write_json(tmp_path / "a.json", {"b": [1, 2], "a": "x"})
    assert rec == file_record(tmp_path / "a.json")
    compact = write_json(tmp_path / "c.json", {"b": [1, 2], "a": "x"}, compact=True)
    assert compact == file_record(tmp_path / "c.json")
    assert json.loads((tmp_path / "c.json").read_text()) == {"a": "x", "b": [1, 2]}


# ---- replicated tensors: stored once, spread over the TP ranks; compared by CRC ---------------

def test_replica_owners_balance_bytes_deterministically():
    sizes = {"a": 10, "b": 10, "c": 30, "d": 5, "e": 5}
    owners = replica_owners(sizes, 2)
    assert owners == {"c": 0, "a": 1, "b": 1, "d": 1, "e": 1}  # largest first, ties to the lower rank
    assert replica_owners(dict(reversed(sizes.items())), 2) == owners  # insertion order is irrelevant
    assert set(replica_owners(sizes, 1).values()) == {0}
    loads = [sum(s for n, s in sizes.items() if replica_owners(sizes, 3)[n] == r) for r in range(3)]
    assert max(loads) - min(loads) <= max(sizes.values())


def test_each_replicated_tensor_is_written_by_one_tp_rank(tmp_path, full):
    tmp = make_tmp_dir(tmp_path / "ck")
    reps = [write_rank_files(tmp, sharded(full, r, 2), tp_rank=r, tp_size=2, pp_rank=0, dp_rank=0,
                             with_replica_digests=True) for r in range(2)]
    replicated = sorted(n for n, t in sharded(full, 0, 2).items() if t.spec.replicated)
    assert len(replicated) == 2
    in_files = [{n for n, _ in shard_file_order(sharded(full, r, 2), r, 2)} for r in range(2)]
    assert all(len([f for f in in_files if n in f]) == 1 for n in replicated)  # once each...
    assert all(any(n in f for n in replicated) for f in in_files)  # ...and both ranks write one
    assert reps[0]["replica_digests"] == reps[1]["replica_digests"] == replica_digests(sharded(full, 1, 2))
    assert sorted(reps[0]["replica_digests"]) == replicated
    reps.append(write_global_files(tmp, CONFIG, None))
    publish(tmp, tmp_path / "ck", assemble_index([{k: v for k, v in r.items() if k != "replica_digests"}
                                                  for r in reps], 2, 1, 1))
    got = consolidate(tmp_path / "ck")
    assert all(torch.equal(got[n], full[n]) for n in full)


def test_tensor_digest_sees_any_one_element_dtype_and_shape():
    t = torch.randn(64, 16, dtype=torch.float64)
    ref = tensor_digest(t)
    for i in (0, 17, t.numel() - 1):
        bad = t.clone()
        bad.view(-1)[i] += 1e-12
        assert tensor_digest(bad) != ref, i
    assert tensor_digest(t.reshape(16, 64)) != ref
    assert tensor_digest(t.view(torch.int64)) != ref
    assert tensor_digest(t.clone()) == ref and tensor_digest(t.t().contiguous().t()) == ref


def test_replica_digests_see_replicas_only(full):
    ref = replica_digests(sharded(full, 1, 2))
    bad = sharded(full, 1, 2)
    t = bad[REPLICATED_NAME].local.clone()
    t.view(-1)[-1] += 1e-12
    bad[REPLICATED_NAME] = ShardedTensor(t, ShardSpec(), bad[REPLICATED_NAME].global_shape)
    assert replica_digests(bad)[REPLICATED_NAME] != ref[REPLICATED_NAME]
    other = sharded(full, 1, 2)  # a different split piece: not part of the replica check
    other[SPLIT_NAME] = ShardedTensor(torch.zeros_like(other[SPLIT_NAME].local), ShardSpec(dim=0), (24, 4))
    assert replica_digests(other) == ref


# ---- publish checks sizes, never re-hashes ----------------------------------------------------

def test_save_and_publish_never_read_files_back(tmp_path, full, monkeypatch):
    _no_file_hashing(monkeypatch)
    path = save_sharded(tmp_path / "s", sharded(full, 0, 1), SINGLE, CONFIG,
                        optimizer_state={"x/exp_avg": torch.ones(3), "step": 2}, extra_state={"k": 1})
    write_emulated_checkpoint(tmp_path / "e", full, tp_size=2, pp_size=2)
    monkeypatch.undo()
    index = json.loads((path / "index.json").read_text())
    for rel, rec in index["files"].items():  # the writers' records are the files' hashes
        assert file_record(path / rel) == rec, rel


def _written(tmp_path, full):
    tmp = make_tmp_dir(tmp_path / "ck")
    reps = [write_rank_files(tmp, sharded(full, r, 2), tp_rank=r, tp_size=2, pp_rank=0, dp_rank=0) for r in range(2)]
    reps.append(write_global_files(tmp, CONFIG, None))
    return tmp, assemble_index(reps, 2, 1, 1)


def test_publish_refuses_a_file_of_another_size(tmp_path, full):
    tmp, index = _written(tmp_path, full)
    with open(tmp / "shards" / "tp01-pp00.safetensors", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(CheckpointError, match=r"tp01-pp00\.safetensors: \d+ bytes on disk, writer reported \d+"):
        publish(tmp, tmp_path / "ck", index)
    assert not (tmp_path / "ck").exists()


def test_publish_refuses_missing_and_stray_files(tmp_path, full):
    tmp, index = _written(tmp_path, full)
    (tmp / "shards" / "tp01-pp00.safetensors").rename(tmp / "shards" / "other.safetensors")
    with pytest.raises(CheckpointError, match=r"tp01-pp00\.safetensors: reported as written but missing"):
        publish(tmp, tmp_path / "ck", index)
    (tmp / "shards" / "other.safetensors").rename(tmp / "shards" / "tp01-pp00.safetensors")
    (tmp / "train_state" / "stray.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"unexpected files \['train_state/stray\.bin'\]"):
        publish(tmp, tmp_path / "ck", index)


def test_every_file_and_directory_is_fsynced(tmp_path, full, monkeypatch):
    synced: list[str] = []
    real = os.fsync

    def recording(fd):
        synced.append(os.path.relpath(os.readlink(f"/proc/self/fd/{fd}"), tmp_path))
        return real(fd)
    monkeypatch.setattr(os, "fsync", recording)
    save_sharded(tmp_path / "s", sharded(full, 0, 1), SINGLE, CONFIG, extra_state={"k": 1})
    monkeypatch.undo()
    # Everything inside the temporary directory (before the rename), then the parent (after it).
    inside = {p.split("/", 1)[1] if "/" in p else "." for p in synced if p.startswith(".s.tmp-")}
    assert {"shards/tp00-pp00.safetensors", "train_state/rng-tp00-pp00-dp00.safetensors", "adapter_config.json",
            "train_state/extra_state.json", "index.json", "shards", "train_state", "."} <= inside, synced
    assert "." in synced and any(p.startswith(".latest.tmp-") for p in synced), synced


def test_fsync_errors_are_raised(tmp_path, monkeypatch):
    def failing(fd):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(OSError, match="Input/output error"):
        write_safetensors(tmp_path / "a.safetensors", {"a": torch.zeros(2)})
    with pytest.raises(OSError, match="Input/output error"):
        with fsync_together():
            write_json(tmp_path / "b.json", {"a": 1})
            write_safetensors(tmp_path / "c.safetensors", {"a": torch.zeros(2)})


# ---- loaders: each file hashed once, while it is read; nothing returned before -----------------

def test_consolidate_hashes_each_file_once(tmp_path, full, hashed_files):
    ckpt = write_emulated_checkpoint(tmp_path / "c", full, 2)
    consolidate(ckpt)
    assert sorted(hashed_files) == ["tp00-pp00.safetensors", "tp01-pp00.safetensors"]
    hashed_files.clear()
    assert [n for n, _ in iter_full_tensors(ckpt)] == sorted(full)
    assert sorted(hashed_files) == ["tp00-pp00.safetensors", "tp01-pp00.safetensors"]
    hashed_files.clear()
    load_sharded(ckpt, SINGLE, expected(full))
    assert sorted(hashed_files) == ["tp00-pp00.safetensors", "tp01-pp00.safetensors"]


def test_export_hashes_each_file_once(tmp_path, full, hashed_files):
    ckpt, hf = _tiny_llama_checkpoint(tmp_path)
    export_peft_from_checkpoint(ckpt, tmp_path / "peft", hf)
    assert sorted(hashed_files) == ["adapter_config.json", "tp00-pp00.safetensors", "tp01-pp00.safetensors"]


def test_reshard_hashes_inputs_once_and_outputs_never(tmp_path, full, hashed_files):
    ckpt = write_emulated_checkpoint(tmp_path / "c", full, 2)
    out = reshard(ckpt, tmp_path / "tp1", 1, progress=False)
    assert sorted(hashed_files) == ["adapter_config.json", "tp00-pp00.safetensors", "tp01-pp00.safetensors"]
    index = json.loads((out / "index.json").read_text())
    for rel, rec in index["files"].items():
        assert file_record(out / rel) == rec, rel


def _corrupt_header(path: Path) -> None:
    """Same size, invalid safetensors header: reading it fails, and so does its checksum."""
    data = bytearray(path.read_bytes())
    data[8] = ord("[")
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["consolidate", "load", "iter", "reshard"])
def test_checksum_error_wins_over_the_read_error_it_causes(tmp_path, full, how):
    ckpt = write_emulated_checkpoint(tmp_path / "c", full, 2)
    _corrupt_header(ckpt / "shards" / "tp01-pp00.safetensors")
    with pytest.raises(CheckpointError, match=r"tp01-pp00\.safetensors: sha256 .* corrupt"):
        if how == "consolidate":
            consolidate(ckpt)
        elif how == "load":
            load_sharded(ckpt, SINGLE, expected(full))
        elif how == "iter":
            list(iter_full_tensors(ckpt))
        else:
            reshard(ckpt, tmp_path / "out", 1, progress=False)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "latest"]  # no reshard temp dir left


def test_iter_full_tensors_yields_nothing_unverified(tmp_path, full):
    ckpt = write_emulated_checkpoint(tmp_path / "c", full, 2)
    path = ckpt / "shards" / "tp01-pp00.safetensors"
    corrupt_last_byte(path)
    it = iter_full_tensors(ckpt)
    with pytest.raises(CheckpointError, match=r"tp01-pp00\.safetensors: sha256"):
        next(it)


# ---- export: no second copy; A copied only where q/k/v or gate/up share it --------------------

HF_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
             "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 4, "vocab_size": 32, "max_position_embeddings": 64,
             "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
LORA = {"r": 2, "lora_alpha": 4, "use_rslora": False}


def _tiny_llama_factors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(2):
        for module, a_in, b_out in (("self_attention.linear_qkv", 16, (4 + 2 * 2) * 4),
                                    ("self_attention.linear_proj", 16, 16), ("mlp.linear_fc1", 16, 48),
                                    ("mlp.linear_fc2", 24, 16)):
            out[f"decoder.layers.{i}.{module}.lora_A.default.weight"] = torch.randn(2, a_in, generator=g)
            out[f"decoder.layers.{i}.{module}.lora_B.default.weight"] = torch.randn(b_out, 2, generator=g)
    return out


def _tiny_llama_checkpoint(tmp_path: Path) -> tuple[Path, dict]:
    from parallel_adapters.adapters.functional import lora_factor_specs

    full = _tiny_llama_factors()
    specs = {}
    for name in full:
        mode, chunks = ("row", 1) if ("linear_proj" in name or "linear_fc2" in name) else (
            "column", 2 if "linear_fc1" in name else 1)
        spec_a, spec_b = lora_factor_specs(mode, chunks)
        specs[name] = spec_a if ".lora_A." in name else spec_b
    tmp = make_tmp_dir(tmp_path / "llama")
    reps = [write_rank_files(tmp, {n: ShardedTensor(specs[n].shard(t, r, 2).clone(), specs[n], tuple(t.shape))
                                   for n, t in full.items()}, tp_rank=r, tp_size=2, pp_rank=0, dp_rank=0)
            for r in range(2)]
    reps.append(write_global_files(tmp, LORA, None))
    publish(tmp, tmp_path / "llama", assemble_index(reps, 2, 1, 1))
    return tmp_path / "llama", HF_CONFIG


def test_peft_tensors_copy_nothing_and_the_file_holds_every_tensor(tmp_path):
    full = _tiny_llama_factors()
    factors = hf_module_adapters(full, LORA, HF_CONFIG)
    layer = "model.layers.0"
    a_qkv = full["decoder.layers.0.self_attention.linear_qkv.lora_A.default.weight"]
    out = peft_tensors(factors)
    key = "base_model.model.{}.{}.weight"
    # q/k/v share the input A itself (written three times), o_proj's factors are the inputs.
    assert {out[key.format(f"{layer}.self_attn.{p}_proj", "lora_A")].data_ptr() for p in "qkv"} == {a_qkv.data_ptr()}
    assert out[key.format(f"{layer}.self_attn.o_proj", "lora_B")].data_ptr() == \
        full["decoder.layers.0.self_attention.linear_proj.lora_B.default.weight"].data_ptr()
    fc1_b = full["decoder.layers.0.mlp.linear_fc1.lora_B.default.weight"]
    assert torch.equal(out[key.format(f"{layer}.mlp.gate_proj", "lora_B")], fc1_b[:24])
    assert torch.equal(out[key.format(f"{layer}.mlp.up_proj", "lora_B")], fc1_b[24:])
    write_safetensors(tmp_path / "a.safetensors", out, checksum=False)
    back = load_file(str(tmp_path / "a.safetensors"))
    assert sorted(back) == sorted(out) and all(torch.equal(back[k], out[k]) for k in out)
    half = peft_tensors(factors, torch.float16)
    assert all(t.dtype == torch.float16 for t in half.values())
    assert all(torch.equal(half[k], out[k].half()) for k in out)


def test_export_from_checkpoint_matches_export_from_tensors(tmp_path):
    ckpt, hf = _tiny_llama_checkpoint(tmp_path)
    a = export_peft_from_checkpoint(ckpt, tmp_path / "a", hf)
    b = export_peft(_tiny_llama_factors(), tmp_path / "b", hf, LORA)
    ta, tb = load_file(str(a / ADAPTER_WEIGHTS_FILE)), load_file(str(b / ADAPTER_WEIGHTS_FILE))
    assert sorted(ta) == sorted(tb) and len(ta) == 2 * 7 * 2
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    with safe_open(str(a / ADAPTER_WEIGHTS_FILE), "pt") as fh:
        assert fh.metadata() == {"format": "pt"}
    assert sorted(p.name for p in a.iterdir()) == [OUTPUT_MARKER, "adapter_config.json", ADAPTER_WEIGHTS_FILE]


def test_export_of_a_corrupt_checkpoint_leaves_no_weights(tmp_path):
    ckpt, hf = _tiny_llama_checkpoint(tmp_path)
    path = ckpt / "shards" / "tp00-pp00.safetensors"
    corrupt_last_byte(path)
    with pytest.raises(CheckpointError, match=r"tp00-pp00\.safetensors: sha256 .* corrupt"):
        export_peft_from_checkpoint(ckpt, tmp_path / "out", hf)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_export_from_a_checkpoint_streams_module_by_module(tmp_path, monkeypatch):
    """The PEFT file is written while the checkpoint is read: one module's factors in memory."""
    ckpt, hf = _tiny_llama_checkpoint(tmp_path)
    events = []
    real_read, real_write = reader_mod.CheckpointReader.read_full, files_mod.SafetensorsWriter.write
    monkeypatch.setattr(reader_mod.CheckpointReader, "read_full",
                        lambda self, name: events.append("read") or real_read(self, name))
    monkeypatch.setattr(files_mod.SafetensorsWriter, "write",
                        lambda self, name, t: events.append("write") or real_write(self, name, t))
    export_peft_from_checkpoint(ckpt, tmp_path / "out", hf)
    assert events[:2] == ["read", "read"] and events[2] == "write"  # a module's A and B, then its outputs
    assert events.count("read") == 2 * 4 * 2 and events.count("write") == 2 * 7 * 2
    assert max(i for i, e in enumerate(events) if e == "read") > events.index("write")
