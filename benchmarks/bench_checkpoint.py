#!/usr/bin/env python
"""Checkpoint I/O benchmark: sharded save (TP=2), consolidate and PEFT export vs a raw save_file.

The adapter of an 8B-shaped Llama (32 layers, hidden 4096, ffn 14336, 32 query heads / 8 KV heads,
head_dim 128), r=16 on linear_qkv, linear_proj, linear_fc1 (SwiGLU, chunks=2) and linear_fc2, fp32
random factors under Megatron names; only the adapter tensors are built, never the base.  Specs
come from `lora_factor_specs` ("column" for qkv/fc1, "row" for proj/fc2), exactly as the model
hands them to the checkpoint code.

Steps, all on the same bytes, in a temp dir on local disk (`--tmp-dir`, default the system temp
dir), repeated `--repeats` times round-robin (the start step rotates every round) so that machine
noise hits every step alike; the figure reported is the median:

- raw save_file:  `safetensors.torch.save_file` of the full tensors, one process (the baseline);
- sharded save:   `save_sharded` on 2 gloo ranks at TP=2 (each rank holds only its shards; rng
                  state included, as `save_checkpoint` does); time = the slower rank's wall time
                  of the collective call (barrier before);
- consolidate:    `consolidate(ckpt)`, one process: every full tensor in memory (verified reads);
- export:         `export_peft_from_checkpoint(ckpt, out, hf_config)`, one process;
- reference rows (not targets): raw save_file + fsync (what a durable raw write costs), the
  CLI's `consolidate --tp 1` (`reshard`, which also writes a new checkpoint), and two floors: the
  least work any sharded save or verifying export must do here, timed the same way --
  save floor: each rank writes its shard file's bytes and sha256s them (no fsync, no collectives,
  no index); export floor: the shard files' sha256 on two threads while the main thread writes
  the PEFT file's bytes from memory (no reading or splitting of factors, no fsync).

Throughput = adapter bytes (the full fp32 factors, the same number for every step) / seconds;
"vs raw" = step throughput / raw save_file throughput of the same run.  After the timed rounds
one extra untimed run of each step under cProfile attributes its time to hashing, fsync, writes,
copies and the like (reported in the JSON under "profile").

    python benchmarks/bench_checkpoint.py --out benchmarks/results/checkpoint.json
"""
from __future__ import annotations

import argparse
import cProfile
import datetime
import gc
import json
import os
import platform
import pstats
import shutil
import statistics
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402

from parallel_adapters.checkpoint.files import fsync_path  # noqa: E402

TP = 2
MB = 1e6  # MB = 10^6 bytes throughout
SHAPE = dict(layers=32, hidden=4096, ffn=14336, heads=32, kv_heads=8, head_dim=128, r=16, vocab=128256)
LORA_CONFIG = {"peft_type": "LORA", "r": SHAPE["r"], "lora_alpha": 2 * SHAPE["r"], "lora_dropout": 0.0,
               "target_modules": ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"],
               "use_rslora": False, "adapter_name": "default", "tp_size": TP, "pp_size": 1}
TARGET_RATIO = 0.5
STEPS = ("raw save_file", "sharded save", "consolidate", "export")
SAVE_FLOOR = "save floor: each rank writes + sha256s its shard, no fsync/collectives"
EXPORT_FLOOR = "export floor: sha256 of the shards while writing the PEFT bytes, no read/fsync"
REFERENCE_STEPS = ("raw save_file + fsync", "consolidate --tp 1 (CLI, writes)", SAVE_FLOOR, EXPORT_FLOOR)
PROFILED_STEPS = STEPS + ("consolidate --tp 1 (CLI, writes)",)


def hf_config(shape: dict = SHAPE) -> dict:
    """A Llama-3-8B-like config.json (unscaled RoPE: what export's LlamaShape accepts)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": shape["hidden"], "intermediate_size": shape["ffn"],
        "num_hidden_layers": shape["layers"], "num_attention_heads": shape["heads"],
        "num_key_value_heads": shape["kv_heads"], "head_dim": shape["head_dim"],
        "vocab_size": shape["vocab"], "max_position_embeddings": 8192, "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
        "torch_dtype": "bfloat16", "bos_token_id": 128000, "eos_token_id": 128001,
    }


def adapter_layout(shape: dict = SHAPE) -> list[tuple[str, tuple[int, int], object]]:
    """(Megatron name, global shape, ShardSpec) of every factor, in a fixed order."""
    from parallel_adapters.adapters.functional import lora_factor_specs

    h, r, hd = shape["hidden"], shape["r"], shape["head_dim"]
    qkv_out = (shape["heads"] + 2 * shape["kv_heads"]) * hd
    modules = [  # (module, parallel mode, chunks, in features, out features)
        ("self_attention.linear_qkv", "column", 1, h, qkv_out),
        ("self_attention.linear_proj", "row", 1, shape["heads"] * hd, h),
        ("mlp.linear_fc1", "column", 2, h, 2 * shape["ffn"]),
        ("mlp.linear_fc2", "row", 1, shape["ffn"], h),
    ]
    out = []
    for i in range(shape["layers"]):
        for module, mode, chunks, fan_in, fan_out in modules:
            spec_a, spec_b = lora_factor_specs(mode, chunks)
            prefix = f"decoder.layers.{i}.{module}"
            out.append((f"{prefix}.lora_A.default.weight", (r, fan_in), spec_a))
            out.append((f"{prefix}.lora_B.default.weight", (fan_out, r), spec_b))
    return out


def full_tensor(index: int, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Deterministic fp32 factor `index` (the same bits in every process)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed * 100_003 + index)) * 0.02


def full_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    return {name: full_tensor(i, shape, seed) for i, (name, shape, _) in enumerate(adapter_layout())}


# ------------------------------------------------------------------------------------------------
# Profiling: cumulative time of the functions that matter, from one cProfile run
# ------------------------------------------------------------------------------------------------

# label -> (file name suffix, function name); cumulative seconds (nested calls are not subtracted).
PROFILE_POINTS = {
    "sha256 of files (files.file_record)": ("checkpoint/files.py", "file_record"),
    "CRC-32 of replicated tensors (writer.tensor_digest)": ("checkpoint/writer.py", "tensor_digest"),
    "fsync (files.fsync_path)": ("checkpoint/files.py", "fsync_path"),
    "safetensors save_file": ("safetensors/torch.py", "save_file"),
    "write_safetensors (write from memory + writeback + fsync + sha256)": ("checkpoint/files.py", "write_safetensors"),
    "write_rank_files": ("checkpoint/writer.py", "write_rank_files"),
    "publish (sizes, index, fsync, rename)": ("checkpoint/writer.py", "publish"),
    "_verify_written (sizes only)": ("checkpoint/writer.py", "_verify_written"),
    "make_tmp_dir": ("checkpoint/writer.py", "make_tmp_dir"),
    "write_rng_state": ("checkpoint/train_state.py", "write_rng_state"),
    "write_json (config/index, fsync + sha256)": ("checkpoint/files.py", "write_json"),
    "_swap_into_place (rename + dir fsync)": ("checkpoint/writer.py", "_swap_into_place"),
    "write_text_atomic (latest, adapter_config.json)": ("checkpoint/files.py", "write_text_atomic"),
    "all_gather_object (collectives, incl. waiting)": ("distributed/distributed_c10d.py", "all_gather_object"),
    "all_reduce (collectives, incl. waiting)": ("distributed/distributed_c10d.py", "all_reduce"),
    "CheckpointReader.verified_path (wait for sha256)": ("checkpoint/reader.py", "verified_path"),
    "CheckpointReader.read_piece (read + clone)": ("checkpoint/reader.py", "read_piece"),
    "read_full (read pieces + unshard + contiguous)": ("checkpoint/reader.py", "read_full"),
    "consolidate": ("checkpoint/consolidate.py", "consolidate"),
    "reshard: _write_shards (read, stream-write, fsync, sha256 of output)":
        ("checkpoint/consolidate.py", "_write_shards"),
    "hf_module_adapters (split qkv/fc1 B)": ("checkpoint/export.py", "hf_module_adapters"),
    "peft_tensors (dtype cast only)": ("checkpoint/export.py", "peft_tensors"),
    "tqdm": ("tqdm/std.py", "__iter__"),
    "torch clone": ("~", "<method 'clone' of 'torch._C.TensorBase' objects>"),
    "torch contiguous": ("~", "<method 'contiguous' of 'torch._C.TensorBase' objects>"),
    "torch cat": ("~", "<built-in method cat of type object at"),
    "hashlib update (all sha256)": ("~", "<method 'update' of '_hashlib.HASH' objects>"),
    "file write (all, main thread)": ("~", "<method 'write' of '_io.BufferedWriter' objects>"),
    "os.fsync (main thread)": ("~", "<built-in method posix.fsync>"),
}
PROFILE_REPEATS = 3


def median_profiles(profiles: list[dict]) -> dict:
    """Per point, the median over profiled runs (a point missing from a run counts as 0)."""
    labels = {k for p in profiles for k in p["points"]}
    points = {}
    for label in sorted(labels, key=list(PROFILE_POINTS).index):
        cum = [p["points"].get(label, {}).get("cumulative_s", 0.0) for p in profiles]
        calls = max(p["points"].get(label, {}).get("calls", 0) for p in profiles)
        points[label] = {"calls": calls, "cumulative_s": round(statistics.median(cum), 4)}
    wall = statistics.median(p["wall_s"] for p in profiles)
    for v in points.values():
        v["share_of_wall"] = round(v["cumulative_s"] / wall, 3)
    return {"wall_s": round(wall, 4), "runs": len(profiles), "walls_s": [p["wall_s"] for p in profiles],
            "points": points}


def profile_summary(profiler: cProfile.Profile, wall_s: float) -> dict:
    stats = pstats.Stats(profiler).stats  # (file, line, func) -> (cc, nc, tt, ct, callers)
    out: dict[str, dict] = {}
    for label, (suffix, func) in PROFILE_POINTS.items():
        calls, cum = 0, 0.0
        for (filename, _, name), (_, ncalls, _, cumtime, _) in stats.items():
            match = (filename == "~" and name.startswith(func)) if suffix == "~" else (
                filename.replace(os.sep, "/").endswith(suffix) and name == func)
            if match:
                calls += ncalls
                cum += cumtime
        if calls:
            out[label] = {"calls": calls, "cumulative_s": round(cum, 4), "share_of_wall": round(cum / wall_s, 3)}
    return {"wall_s": round(wall_s, 4), "points": out}


def _profiled(fn, *args, **kwargs) -> tuple[object, dict]:
    gc.collect()
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    try:
        result = fn(*args, **kwargs)
    finally:
        profiler.disable()
    return result, profile_summary(profiler, time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------
# Worker side (2 gloo ranks of tests.harness.pool.WorkerPool)
# ------------------------------------------------------------------------------------------------

_RANK_STATE: dict = {}


def rank_setup_job(seed: int) -> dict:
    """Build this rank's shards (full tensors generated one at a time, only the shard is kept)."""
    import torch.distributed as dist

    from parallel_adapters.distributed.sharding import ShardedTensor

    torch.set_num_threads(1)
    tp_rank = dist.get_rank() % TP
    from parallel_adapters.checkpoint.writer import shard_file_order

    tensors = {}
    for i, (name, shape, spec) in enumerate(adapter_layout()):
        tensors[name] = ShardedTensor(spec.shard(full_tensor(i, shape, seed), tp_rank, TP).clone(), spec, shape)
    _RANK_STATE["tensors"] = tensors
    _RANK_STATE["file_order"] = [t.local for _, t in shard_file_order(tensors, tp_rank, TP)]
    held = sum(t.local.numel() * t.local.element_size() for t in tensors.values())
    owned = sum(t.numel() * t.element_size() for t in _RANK_STATE["file_order"])
    return {"rank": dist.get_rank(), "bytes_held": held, "bytes_written": owned}


def rank_save_floor_job(path: str) -> dict:
    """The save floor on one rank: its shard file's bytes written from memory, then sha256'd."""
    import hashlib

    import torch.distributed as dist

    from parallel_adapters.checkpoint.files import tensor_bytes

    views = [tensor_bytes(t) for t in _RANK_STATE["file_order"]]
    gc.collect()
    dist.barrier()
    t0 = time.perf_counter()
    with open(f"{path}.{dist.get_rank()}", "wb") as fh:
        for v in views:
            fh.write(v)
    digest = hashlib.sha256()
    for v in views:
        digest.update(v)
    digest.hexdigest()
    return {"rank": dist.get_rank(), "wall_s": time.perf_counter() - t0}


def rank_save_job(directory: str, profile: bool = False) -> dict:
    """One collective save_sharded; this rank's wall and CPU time of the call."""
    import torch.distributed as dist

    from parallel_adapters.checkpoint.sharded import save_sharded
    from tests.distributed.checkpoint_jobs import make_groups

    groups = make_groups(TP)
    tensors = _RANK_STATE["tensors"]
    gc.collect()
    dist.barrier()
    if profile:
        _, prof = _profiled(save_sharded, directory, tensors, groups, LORA_CONFIG)
        return {"rank": dist.get_rank(), "profile": prof}
    cpu0, t0 = time.process_time(), time.perf_counter()
    save_sharded(directory, tensors, groups, LORA_CONFIG)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"rank": dist.get_rank(), "wall_s": wall, "cpu_s": cpu}


# ------------------------------------------------------------------------------------------------
# Driver side
# ------------------------------------------------------------------------------------------------

def _dir_files(path: str) -> tuple[int, int]:
    count = size = 0
    for root, _, files in os.walk(path):
        for f in files:
            count += 1
            size += os.path.getsize(os.path.join(root, f))
    return count, size


class Runner:
    """Each step: a callable timed in this process (or on the pool), plus its output's files."""

    def __init__(self, pool, work: str, full: dict, ckpt: str) -> None:
        from parallel_adapters.checkpoint.export import hf_module_adapters, peft_tensors
        from parallel_adapters.checkpoint.files import tensor_bytes

        self.pool, self.work, self.full, self.ckpt = pool, work, full, ckpt
        peft = peft_tensors(hf_module_adapters(full, LORA_CONFIG, hf_config()))
        self.peft_views = [tensor_bytes(t) for t in peft.values()]  # what the export writes, in memory
        self.counter = 0
        self.files: dict[str, dict] = {}
        self.cpu: dict[str, list[float]] = {s: [] for s in STEPS + REFERENCE_STEPS}

    def _fresh(self, stem: str) -> str:
        self.counter += 1
        return os.path.join(self.work, f"{stem}-{self.counter}")

    def _record(self, step: str, path: str) -> None:
        count, size = _dir_files(path) if os.path.isdir(path) else (1, os.path.getsize(path))
        self.files[step] = {"files": count, "bytes_on_disk": size}

    def _local(self, step: str, fn) -> float:
        gc.collect()
        cpu0, t0 = time.process_time(), time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
        self.cpu[step].append(time.process_time() - cpu0)
        return wall

    def run(self, step: str) -> float:
        from safetensors.torch import save_file

        from parallel_adapters.checkpoint.consolidate import consolidate, reshard
        from parallel_adapters.checkpoint.export import export_peft_from_checkpoint

        if step == "raw save_file":
            path = self._fresh("raw") + ".safetensors"
            wall = self._local(step, lambda: save_file(self.full, path))
        elif step == "raw save_file + fsync":
            path = self._fresh("rawsync") + ".safetensors"
            wall = self._local(step, lambda: (save_file(self.full, path), fsync_path(path)))
        elif step == "sharded save":
            path = self._fresh(os.path.join("saves", "step"))
            results = self.pool.run(rank_save_job, path)
            wall = max(r["wall_s"] for r in results)
            self.cpu[step].append(sum(r["cpu_s"] for r in results))
        elif step == "consolidate":
            out: dict = {}
            wall = self._local(step, lambda: out.update(consolidate(self.ckpt)))
            self.files[step] = {"files": 0, "bytes_in_memory": sum(t.numel() * t.element_size() for t in out.values())}
            del out
            return wall
        elif step == "export":
            path = self._fresh("peft")
            wall = self._local(step, lambda: export_peft_from_checkpoint(self.ckpt, path, hf_config()))
        elif step == "consolidate --tp 1 (CLI, writes)":
            path = self._fresh("tp1")
            wall = self._local(step, lambda: reshard(self.ckpt, path, 1, progress=False))
        elif step == SAVE_FLOOR:
            path = self._fresh("savefloor")
            os.makedirs(path)
            wall = max(r["wall_s"] for r in self.pool.run(rank_save_floor_job, os.path.join(path, "shard")))
        elif step == EXPORT_FLOOR:
            path = self._fresh("exportfloor")
            wall = self._local(step, lambda: self._export_floor(path))
        else:
            raise ValueError(step)
        self._record(step, path)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        return wall

    def _export_floor(self, path: str) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from parallel_adapters.checkpoint.files import file_record

        shards = sorted(os.path.join(self.ckpt, "shards", f) for f in os.listdir(os.path.join(self.ckpt, "shards")))
        with ThreadPoolExecutor(len(shards)) as hashers:
            digests = [hashers.submit(file_record, f) for f in shards]
            with open(path, "wb") as fh:
                for v in self.peft_views:
                    fh.write(v)
            for d in digests:
                d.result()

    def profile(self, step: str, repeats: int = PROFILE_REPEATS) -> dict:
        """Median over `repeats` cProfile runs (one run is too noisy on a shared machine)."""
        runs = [self._profile_once(step) for _ in range(repeats)]
        if step == "sharded save":
            return {who: median_profiles([r[who] for r in runs]) for who in runs[0]}
        return median_profiles(runs)

    def _profile_once(self, step: str) -> dict:
        from safetensors.torch import save_file

        from parallel_adapters.checkpoint.consolidate import consolidate, reshard
        from parallel_adapters.checkpoint.export import export_peft_from_checkpoint

        if step == "sharded save":
            path = self._fresh(os.path.join("saves", "prof"))
            results = self.pool.run(rank_save_job, path, True)
            shutil.rmtree(path)
            return {f"rank {r['rank']}": r["profile"] for r in results}
        if step == "consolidate":
            return _profiled(consolidate, self.ckpt)[1]
        path = self._fresh("prof")
        if step == "raw save_file":
            prof = _profiled(save_file, self.full, path)[1]
            os.remove(path)
            return prof
        if step == "export":
            prof = _profiled(export_peft_from_checkpoint, self.ckpt, path, hf_config())[1]
            shutil.rmtree(path)
            return prof
        if step == "consolidate --tp 1 (CLI, writes)":
            prof = _profiled(reshard, self.ckpt, path, 1, progress=False)[1]
            shutil.rmtree(path)
            return prof
        raise ValueError(step)


def check_round_trip(ckpt: str, full: dict, work: str) -> dict:
    """Untimed: the consolidated tensors are the original bits; the export has PEFT's keys."""
    from safetensors import safe_open

    from parallel_adapters.checkpoint.consolidate import consolidate
    from parallel_adapters.checkpoint.export import export_peft_from_checkpoint

    got = consolidate(ckpt)
    bitwise = sorted(got) == sorted(full) and all(torch.equal(got[n], full[n]) for n in full)
    out = export_peft_from_checkpoint(ckpt, os.path.join(work, "peft-check"), hf_config())
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as fh:
        keys = list(fh.keys())
        q_b = fh.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")
    expect_keys = SHAPE["layers"] * 7 * 2
    qkv_b = full["decoder.layers.0.self_attention.linear_qkv.lora_B.default.weight"]
    per_group = SHAPE["heads"] // SHAPE["kv_heads"] + 2
    groups = qkv_b.view(SHAPE["kv_heads"], per_group, SHAPE["head_dim"], SHAPE["r"])  # [q heads of g; k; v]
    q_expected = groups[:, :per_group - 2].reshape(-1, SHAPE["r"])
    shutil.rmtree(out)
    return {"consolidated_bitwise_equal": bitwise, "peft_keys": len(keys), "peft_keys_expected": expect_keys,
            "q_proj_lora_B_split_correct": torch.equal(q_b, q_expected)}


def calibrate(full: dict, repeats: int = 3) -> dict:
    """This machine's sha256 and in-memory copy speed over the adapter bytes (MB/s, median)."""
    import hashlib

    flat = torch.cat([t.reshape(-1) for t in full.values()])
    view = memoryview(flat.view(torch.uint8).numpy())
    sha, copy = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        hashlib.sha256(view).hexdigest()
        sha.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        flat.clone()
        copy.append(time.perf_counter() - t0)
    nbytes = flat.numel() * flat.element_size()
    return {"sha256_mb_per_s": round(nbytes / MB / statistics.median(sha), 1),
            "clone_mb_per_s": round(nbytes / MB / statistics.median(copy), 1)}


def byte_accounting(full: dict, setup: list[dict]) -> dict:
    """How many bytes each step hashes, copies and writes, from the code paths (not measured)."""
    layout = {name: spec for name, _, spec in adapter_layout()}
    replicated = sum(t.numel() * t.element_size() for n, t in full.items() if layout[n].replicated)
    total = sum(t.numel() * t.element_size() for t in full.values())
    rank_files = [r["bytes_written"] for r in sorted(setup, key=lambda r: r["rank"])]

    def a_bytes(module: str) -> int:
        return sum(full[n].numel() * full[n].element_size() for n in full if "lora_A" in n and module in n)
    return {
        "adapter_bytes": total, "replicated_bytes": replicated, "shard_file_bytes_per_rank": rank_files,
        "sharded_save": {
            "sha256_bytes_per_rank": rank_files, "crc32_bytes_per_rank": replicated,
            "explanation": ("each replicated tensor is written by one TP rank (layout.replica_owners, by size); "
                            "each rank writes its shard file from memory, starting the disk writeback every "
                            "16 MiB, sha256s the same bytes while fsync runs, and CRC-32s every replicated "
                            "tensor it holds for the TP-replica check; rank 0 checks sizes, writes the index "
                            "and renames"),
        },
        "consolidate": {"sha256_bytes": total, "copies": "one per byte: pieces cat'ed (or cloned) out of the mmap"},
        "export": {
            "sha256_bytes": total,
            "tensor_bytes_written": total + 2 * a_bytes("linear_qkv") + a_bytes("linear_fc1"),  # A: qkv x3, fc1 x2
            "copies": ("consolidate (one per byte), q/k/v B gathered per query group; the file is written "
                       "from those tensors' memory (A written 3 times for q/k/v, twice for gate/up, never "
                       "copied), with writeback started as it goes, then fsync"),
        },
    }


def _versions() -> dict:
    from importlib.metadata import version

    out = {}
    for pkg in ("torch", "safetensors", "tqdm", "numpy", "megatron-core", "peft", "transformers"):
        try:
            out[pkg] = version(pkg)
        except Exception:  # noqa: BLE001
            out[pkg] = None
    return out


def _filesystem(path: str) -> str:
    best, fs = "", "?"
    try:
        with open("/proc/mounts", encoding="utf-8") as fh:
            for line in fh:
                parts = line.split()
                mount = parts[1]
                if os.path.realpath(path).startswith(mount) and len(mount) > len(best):
                    best, fs = mount, f"{parts[2]} ({parts[0]} on {mount})"
    except OSError:
        pass
    return fs


def summarise(times: dict[str, list[float]], adapter_bytes: int) -> dict:
    raw = statistics.median(times["raw save_file"])
    out = {}
    for step, ts in times.items():
        med = statistics.median(ts)
        paired = [r / t for r, t in zip(times["raw save_file"], ts)]
        out[step] = {
            "seconds": [round(t, 4) for t in ts], "seconds_median": round(med, 4),
            "mb_per_s": round(adapter_bytes / MB / med, 1),
            "vs_raw": round(raw / med, 3),  # (bytes / med) / (bytes / raw)
            "vs_raw_paired_median": round(statistics.median(paired), 3),
            "meets_target": (raw / med) >= TARGET_RATIO if step in STEPS[1:] else None,
        }
    return out


def markdown_table(summary: dict, adapter_bytes: int) -> str:
    rows = ["| step | MB | seconds | MB/s | vs raw save_file |", "|---|---|---|---|---|"]
    for step, s in summary.items():
        label = step if step in STEPS else f"{step} (reference)"
        rows.append(f"| {label} | {adapter_bytes / MB:.1f} | {s['seconds_median']:.3f} | "
                    f"{s['mb_per_s']:.0f} | {s['vs_raw']:.2f}x |")
    return "\n".join(rows)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "benchmarks", "results", "checkpoint.json"))
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (median reported)")
    parser.add_argument("--tmp-dir", default=None, help="where the work directory is made (local disk)")
    parser.add_argument("--no-profile", action="store_true", help="skip the untimed cProfile pass")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    started = time.monotonic()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    from tests.harness.pool import WorkerPool

    layout = adapter_layout()
    full = full_tensors()
    adapter_bytes = sum(t.numel() * t.element_size() for t in full.values())
    work = tempfile.mkdtemp(prefix="pa_bench_ckpt_", dir=args.tmp_dir)
    result: dict = {
        "benchmark": "checkpoint I/O: sharded save (TP=2), consolidate, PEFT export vs raw safetensors save_file",
        "metadata": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python", os.path.relpath(os.path.abspath(sys.argv[0]), REPO_ROOT)] + sys.argv[1:]),
            "versions": _versions(), "python": platform.python_version(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "work_dir_filesystem": _filesystem(work),
            "ranks": TP, "tensor_parallel": TP, "backend": "gloo", "threads_per_process": 1,
            "repeats": args.repeats, "target_vs_raw": TARGET_RATIO, "mb": "10^6 bytes",
            "timing": ("wall time per step, median of the repeats; rounds interleaved, the start step rotating "
                       "every round; gc.collect() before each step. sharded save = the slower rank's wall time of "
                       "save_sharded (barrier before), the other steps one process. MB/s = adapter bytes / "
                       "seconds for every step; vs_raw = raw save_file median seconds / step median seconds. "
                       "Files are read back from the page cache (just written), never from cold disk."),
        },
        "shape": {**SHAPE, "qkv_out": (SHAPE["heads"] + 2 * SHAPE["kv_heads"]) * SHAPE["head_dim"],
                  "fc1_out": 2 * SHAPE["ffn"], "targets": LORA_CONFIG["target_modules"], "dtype": "float32"},
        "bytes": {"adapter_bytes": adapter_bytes, "adapter_mb": round(adapter_bytes / MB, 3),
                  "tensors": len(layout)},
    }
    try:
        with WorkerPool(2) as pool:
            setup = pool.run(rank_setup_job, 0)
            result["bytes"]["per_rank"] = setup
            ckpt = os.path.join(work, "ckpt", "step-0")
            pool.run(rank_save_job, ckpt)  # the checkpoint consolidate/export read (also a warm-up save)
            result["checks"] = check_round_trip(ckpt, full, work)
            result["calibration"] = calibrate(full)
            result["byte_accounting"] = byte_accounting(full, setup)
            runner = Runner(pool, work, full, ckpt)
            for step in STEPS + REFERENCE_STEPS:  # warm-up: imports, first-touch allocations
                runner.run(step)
            steps = list(STEPS + REFERENCE_STEPS)
            times: dict[str, list[float]] = {s: [] for s in steps}
            for rnd in range(args.repeats):
                order = steps[rnd % len(steps):] + steps[:rnd % len(steps)]
                for step in order:
                    times[step].append(runner.run(step))
                print(f"round {rnd + 1}/{args.repeats}: " + ", ".join(f"{s} {times[s][-1]:.3f}s" for s in steps),
                      flush=True)
            summary = summarise(times, adapter_bytes)
            for step, s in summary.items():
                cpu = runner.cpu[step][-args.repeats:]
                s["cpu_seconds_median"] = round(statistics.median(cpu), 4) if cpu else None
                s.update(runner.files.get(step, {}))
            result["steps"] = summary
            if not args.no_profile:
                result["profile"] = {s: runner.profile(s) for s in PROFILED_STEPS}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["below_target"] = [s for s in STEPS[1:] if not result["steps"][s]["meets_target"]]
    result["metadata"]["runtime_s"] = round(time.monotonic() - started, 1)
    table = markdown_table(result["steps"], adapter_bytes)
    result["markdown_table"] = table
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=2)
        fh.write("\n")
    print(table)
    print(f"checks: {result['checks']}")
    if result.get("profile"):
        for step, prof in result["profile"].items():
            for who, p in ({step: prof} if "wall_s" in prof else prof).items():
                top = sorted(p["points"].items(), key=lambda kv: -kv[1]["cumulative_s"])[:8]
                print(f"profile {step} [{who}] wall {p['wall_s']:.3f}s: " +
                      "; ".join(f"{k} {v['cumulative_s']:.3f}s" for k, v in top))
    print(f"wrote {args.out} in {result['metadata']['runtime_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
