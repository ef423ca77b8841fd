#!/usr/bin/env python
"""PiSSA initialisation benchmark: ours at TP=2 (2 gloo ranks) vs PEFT's on the full matrices.

The layer set of one Llama-3-8B transformer layer (hidden 4096, ffn 14336, GQA 32/8 heads, head
dim 128), q/k/v and gate/up separate as in the HF model, so that both sides decompose the same
seven fp32 matrices:

    q_proj [4096, 4096] column   k_proj, v_proj [1024, 4096] column   o_proj [4096, 4096] row
    gate_proj, up_proj [14336, 4096] column                           down_proj [4096, 14336] row

Weights: synthetic, with a decaying spectrum as trained weights have (a planted rank-256 part with
singular values ~ 1/j plus a Gaussian floor at half the last planted one, entries' std 0.02),
generated tile by tile from a seed so that each rank builds only its own shard and PEFT the full
matrix, bit-identical.

- ours: Megatron ColumnParallelLinear / RowParallelLinear at TP=2 (1 thread per rank), timed from
  `get_adapter_model(..., LoraConfig(init_lora_weights=METHOD))` to its return (injection + the
  decomposition + the residual written into the base shard); the collectives each rank issues
  during it are counted exactly (tests/harness/counting: payload bytes this rank passes in).
- peft: `peft.get_peft_model` on nn.Linear modules of the full shapes, in one process
  (--peft-threads torch threads, 2 by default: the same two cores), timed the same way.
  `pissa` is torch.linalg.svd of every full matrix (hours for the set on 2 cores under load), so
  by default PEFT's exact SVD runs on ONE layer of each shape (q_proj, k_proj, gate_proj,
  down_proj) and the set's time is the sum of those per-shape times (q = o, k = v, gate = up);
  `--peft-exact-layers all` runs all seven.

Memory, per process: the peak RSS (VmHWM) over the whole process, and the peak reached during the
init above the RSS just before it (the peak is reset there through /proc/self/clear_refs).
Exact PiSSA is also checked: ours and PEFT's factors agree on every layer both ran (signs
aligned per singular pair: PEFT keeps LAPACK's signs).

    python benchmarks/bench_init.py --out benchmarks/results/init.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import zlib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

TILE = 256
PLANTED = 256
TP = 2
ONE_PER_SHAPE = ["q_proj", "k_proj", "gate_proj", "down_proj"]
SAME_SHAPE = {"o_proj": "q_proj", "v_proj": "k_proj", "up_proj": "gate_proj"}


def layer_shapes(hidden: int, ffn: int, heads: int, kv_heads: int) -> dict[str, tuple[int, int, str]]:
    """name -> (out, in, Megatron parallel mode)."""
    kv = hidden // heads * kv_heads
    return {"q_proj": (hidden, hidden, "column"), "k_proj": (kv, hidden, "column"),
            "v_proj": (kv, hidden, "column"), "o_proj": (hidden, hidden, "row"),
            "gate_proj": (ffn, hidden, "column"), "up_proj": (ffn, hidden, "column"),
            "down_proj": (hidden, ffn, "row")}


# ------------------------------------------------------------------------------------------------
# Weights and memory (both sides)
# ------------------------------------------------------------------------------------------------

def _gen(seed: int, *key):
    import torch

    return torch.Generator().manual_seed(zlib.crc32(f"{seed}/{'/'.join(map(str, key))}".encode()))


def weight_block(seed: int, name: str, out_f: int, in_f: int, rows: range, cols: range):
    """W[rows, cols] (tile-aligned ranges) of the synthetic weight `name` [out_f, in_f], float32."""
    import torch

    assert all(x % TILE == 0 for x in (rows.start, rows.stop, cols.start, cols.stop)), "tile-aligned blocks only"
    sigma = 1.0 / torch.arange(1, PLANTED + 1, dtype=torch.float64)
    eps = 0.5 * float(sigma[-1]) / (out_f ** 0.5 + in_f ** 0.5)
    scale = 0.02 * (out_f * in_f) ** 0.5 / float(sigma.square().sum() + eps ** 2 * out_f * in_f) ** 0.5
    u = torch.randn(out_f, PLANTED, generator=_gen(seed, name, "u"))[rows.start:rows.stop] / out_f ** 0.5
    v = torch.randn(PLANTED, in_f, generator=_gen(seed, name, "v"))[:, cols.start:cols.stop] / in_f ** 0.5
    w = (u * sigma.float()) @ v
    for i in range(rows.start, rows.stop, TILE):
        for j in range(cols.start, cols.stop, TILE):
            noise = torch.randn(TILE, TILE, generator=_gen(seed, name, i, j))
            w[i - rows.start:i - rows.start + TILE, j - cols.start:j - cols.start + TILE] += eps * noise
    return w.mul_(scale)


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory(rss_before: float, reset: bool) -> dict:
    import resource

    peak = _status_mb("VmHWM")
    return {"rss_before_init_mb": round(rss_before, 1), "peak_rss_mb": round(peak, 1),
            "init_extra_peak_mb": round(peak - rss_before, 1) if reset else None,
            "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


# ------------------------------------------------------------------------------------------------
# Ours (runs on the 2 gloo ranks of tests.harness.pool.WorkerPool)
# ------------------------------------------------------------------------------------------------

def _parallel_layers(shapes: dict, dims: dict, tp_rank: int, seed: int):
    import torch
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=dims["hidden"], num_attention_heads=dims["heads"],
                               num_query_groups=dims["kv_heads"], use_cpu_initialization=True,
                               perform_initialization=False, params_dtype=torch.float32,
                               gradient_accumulation_fusion=False, tensor_model_parallel_size=TP)
    container = torch.nn.Module()
    for name, (out_f, in_f, mode) in shapes.items():
        if mode == "column":
            layer = ColumnParallelLinear(in_f, out_f, config=config, init_method=torch.nn.init.zeros_, bias=False,
                                         gather_output=False)
            rows, cols = range(tp_rank * out_f // TP, (tp_rank + 1) * out_f // TP), range(0, in_f)
        else:
            layer = RowParallelLinear(in_f, out_f, config=config, init_method=torch.nn.init.zeros_, bias=False,
                                      input_is_parallel=True, skip_bias_add=False)
            rows, cols = range(0, out_f), range(tp_rank * in_f // TP, (tp_rank + 1) * in_f // TP)
        with torch.no_grad():
            layer.weight.copy_(weight_block(seed, name, out_f, in_f, rows, cols))
        container.add_module(name, layer)
    return container


def ours_job(shapes: dict, dims: dict, method: str, r: int, alpha: int, seed: int, keep: list[str]) -> dict:
    """get_adapter_model with the decomposition init on this rank's shards: time, memory, traffic."""
    import torch
    import torch.distributed as dist

    from parallel_adapters import LoraConfig, get_adapter_model
    from parallel_adapters.adapters import decomposition_init
    from parallel_adapters.decompose import pissa
    from parallel_adapters.mcore.compat import initialize_model_parallel
    from tests.harness import counting

    torch.set_num_threads(1)
    groups = initialize_model_parallel(TP, 1)
    container = _parallel_layers(shapes, dims, groups.tp_rank, seed)
    weights_mb = sum(p.numel() * p.element_size() for p in container.parameters()) / 2**20
    per_layer: dict[str, dict] = {}
    initialize_host, pissa_factors = decomposition_init._initialize_host, pissa.pissa_factors

    def timed_host(host, *args):
        per_layer[host.module_name] = entry = {}
        t0 = time.perf_counter()
        initialize_host(host, *args)
        entry["time_s"] = time.perf_counter() - t0

    def reported(*args, **kwargs):
        a, b, report = pissa_factors(*args, **kwargs)
        entry = per_layer[next(reversed(per_layer))]  # the host being initialised
        entry.update(iterations=report.iterations, converged=bool(report.converged))
        return a, b, report

    decomposition_init._initialize_host, pissa.pissa_factors = timed_host, reported
    try:
        dist.barrier()
        rss_before, reset = _status_mb("VmRSS"), reset_peak()
        c0, t0 = time.process_time(), time.perf_counter()
        with counting.counted() as calls:
            model = get_adapter_model(container, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(shapes),
                                                            init_lora_weights=method, seed=seed), groups=groups)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        mem = memory(rss_before, reset)
    finally:
        decomposition_init._initialize_host, pissa.pissa_factors = initialize_host, pissa_factors
    factors = {}
    for name in keep:
        layer = getattr(model.model, name)
        factors[name] = (layer.lora_A["default"].weight.detach().clone(), layer.spec_a,
                         layer.lora_B["default"].weight.detach().clone(), layer.spec_b)
    dist.barrier()
    return {"wall_s": wall, "cpu_s": cpu, "calls": dict(calls.calls), "bytes": dict(calls.bytes),
            "per_layer": per_layer, "memory": mem, "weights_mb": round(weights_mb, 1), "factors": factors}


def run_ours(shapes: dict, dims: dict, method: str, r: int, alpha: int, seed: int, keep: list[str]):
    from tests.harness.pool import WorkerPool

    with WorkerPool(TP) as pool:  # a fresh pair of processes per method: clean peaks
        ranks = pool.run(ours_job, shapes, dims, method, r, alpha, seed, keep, timeout=3600)
    assert all(r_["calls"] == ranks[0]["calls"] and r_["bytes"] == ranks[0]["bytes"] for r_ in ranks)
    factors = {}
    for name in keep:
        a_spec, b_spec = ranks[0]["factors"][name][1], ranks[0]["factors"][name][3]
        factors[name] = (a_spec.unshard([rk["factors"][name][0] for rk in ranks]),
                         b_spec.unshard([rk["factors"][name][2] for rk in ranks]))
    summary = {
        "wall_s": round(max(rk["wall_s"] for rk in ranks), 2),
        "cpu_s_per_rank": [round(rk["cpu_s"], 2) for rk in ranks],
        "collectives_per_rank": ranks[0]["calls"],
        "bytes_per_rank": ranks[0]["bytes"], "total_bytes_per_rank": sum(ranks[0]["bytes"].values()),
        "memory_per_rank": [rk["memory"] for rk in ranks],
        "weights_mb_per_rank": [rk["weights_mb"] for rk in ranks],
        "per_layer": {n: {"time_s": round(max(rk["per_layer"][n]["time_s"] for rk in ranks), 2),
                          **{k: v for k, v in ranks[0]["per_layer"][n].items() if k != "time_s"}}
                      for n in shapes},
    }
    return summary, factors


# ------------------------------------------------------------------------------------------------
# PEFT (one process: `bench_init.py --peft-worker METHOD`, run by the driver)
# ------------------------------------------------------------------------------------------------

def peft_worker(args: argparse.Namespace) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.layer import LoraLayer
    from safetensors.torch import save_file

    torch.set_num_threads(args.peft_threads)
    shapes = layer_shapes(args.hidden, args.ffn, args.heads, args.kv_heads)
    names = args.peft_worker_layers.split(",")
    container = torch.nn.Module()
    for name in names:
        out_f, in_f, _ = shapes[name]
        layer = torch.nn.utils.skip_init(torch.nn.Linear, in_f, out_f, bias=False)
        with torch.no_grad():
            layer.weight.copy_(weight_block(args.seed, name, out_f, in_f, range(0, out_f), range(0, in_f)))
        container.add_module(name, layer)
    per_layer, original = {}, LoraLayer.pissa_init

    def timed(self, adapter_name, init):
        c0, t0 = time.process_time(), time.perf_counter()
        original(self, adapter_name, init)
        per_layer[len(per_layer)] = (time.perf_counter() - t0, time.process_time() - c0)

    LoraLayer.pissa_init = timed
    rss_before, reset = _status_mb("VmRSS"), reset_peak()
    c0, t0 = time.process_time(), time.perf_counter()
    model = get_peft_model(container, LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=names,
                                                 init_lora_weights=args.peft_worker))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    mem = memory(rss_before, reset)
    LoraLayer.pissa_init = original
    factors = {}
    for name in names:
        layer = getattr(model.base_model.model, name)
        factors[f"{name}.A"] = layer.lora_A["default"].weight.detach().contiguous()
        factors[f"{name}.B"] = layer.lora_B["default"].weight.detach().contiguous()
    save_file(factors, args.peft_worker_out)
    print(json.dumps({"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "memory": mem, "threads": args.peft_threads,
                      "layers": names, "per_layer": {n: {"time_s": round(per_layer[i][0], 2), "cpu_s": round(per_layer[i][1], 2)}
                                    for i, n in enumerate(names)},
                      "weights_mb": round(sum(p.numel() * 4 for p in container.parameters()) / 2**20, 1)}))


def run_peft(args: argparse.Namespace, method: str, names: list[str], tmp: str):
    from safetensors.torch import load_file

    out = os.path.join(tmp, f"peft_{method}.safetensors")
    cmd = [sys.executable, os.path.abspath(__file__), "--peft-worker", method,
           "--peft-worker-layers", ",".join(names), "--peft-worker-out", out, *_shape_flags(args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if proc.returncode != 0:
        raise RuntimeError(f"PEFT worker ({method}) failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), load_file(out)


def _shape_flags(args: argparse.Namespace) -> list[str]:
    return [f"--hidden={args.hidden}", f"--ffn={args.ffn}", f"--heads={args.heads}", f"--kv-heads={args.kv_heads}",
            f"--r={args.r}", f"--alpha={args.alpha}", f"--seed={args.seed}", f"--peft-threads={args.peft_threads}"]


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------

def factor_agreement(ours: dict, peft: dict) -> dict[str, float]:
    """Per layer: max |ours - PEFT| / max |PEFT| over A and B, each singular pair's sign aligned."""
    out = {}
    for name, (a, b) in ours.items():
        pa, pb = peft[f"{name}.A"], peft[f"{name}.B"]
        signs = (a * pa).sum(dim=1).sign()  # +-1 per singular pair
        err = max(float((a * signs[:, None] - pa).abs().max() / pa.abs().max()),
                  float((b * signs - pb).abs().max() / pb.abs().max()))
        out[name] = float(f"{err:.3g}")
    return out


def set_time(peft: dict, shapes: dict, key: str = "time_s") -> tuple[float, bool]:
    """PEFT's wall (or CPU) time for the whole layer set: measured (the whole get_peft_model), or
    the sum of the per-shape decompositions (estimated=True)."""
    times = {n: v[key] for n, v in peft["per_layer"].items()}
    if set(times) == set(shapes):
        return peft["wall_s" if key == "time_s" else "cpu_s"], False
    return round(sum(times[n if n in times else SAME_SHAPE[n]] for n in shapes), 2), True


def markdown_table(result: dict) -> str:
    rows = ["| method | implementation | layers run | init wall s (7-matrix set) | init CPU s (all processes) "
            "| peak RSS MB per process (weights MB) | init extra peak MB | collectives per rank "
            "| MB on the wire per rank |",
            "|---|---|---|---|---|---|---|---|---|"]
    for method, entry in result["methods"].items():
        o, p = entry["ours"], entry["peft"]
        calls = ", ".join(f"{n} {op}" for op, n in sorted(o["collectives_per_rank"].items()))
        peaks = " / ".join(f"{m['peak_rss_mb']:.0f}" for m in o["memory_per_rank"])
        extras = " / ".join(f"{m['init_extra_peak_mb']}" for m in o["memory_per_rank"])
        rows.append(f"| {method} | ours TP=2 (2 ranks x 1 thread) | all 7 | {o['wall_s']:.1f} | "
                    f"{sum(o['cpu_s_per_rank']):.1f} | {peaks} "
                    f"({o['weights_mb_per_rank'][0]:.0f} each) | {extras} | {calls} | "
                    f"{o['total_bytes_per_rank'] / 2**20:.2f} |")
        est = " (sum of one per shape)" if entry["peft_set_time_estimated"] else ""
        rows.append(f"| {method} | PEFT, one process x {p['threads']} threads | {len(p['layers'])} | "
                    f"{entry['peft_set_time_s']:.1f}{est} | {entry['peft_set_cpu_s']:.1f}{est} | "
                    f"{p['memory']['peak_rss_mb']:.0f} "
                    f"({p['weights_mb']:.0f}) | {p['memory']['init_extra_peak_mb']} | none | 0 |")
    return "\n".join(rows)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "benchmarks", "results", "init.json"))
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--ffn", type=int, default=14336)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--alpha", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default="pissa,pissa_niter_4")
    parser.add_argument("--peft-threads", type=int, default=2)
    parser.add_argument("--peft-exact-layers", choices=["one-per-shape", "all"], default="one-per-shape")
    parser.add_argument("--peft-worker", help=argparse.SUPPRESS)
    parser.add_argument("--peft-worker-layers", help=argparse.SUPPRESS)
    parser.add_argument("--peft-worker-out", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.peft_worker:
        peft_worker(args)
        return 0
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    from benchmarks import bench_layers as bl

    started, load_start = time.monotonic(), bl.load_average()
    shapes = layer_shapes(args.hidden, args.ffn, args.heads, args.kv_heads)
    dims = dict(hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads)
    methods = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            exact = method == "pissa"
            peft_names = ONE_PER_SHAPE if exact and args.peft_exact_layers == "one-per-shape" else list(shapes)
            print(f"{method}: ours at TP={TP} ...", flush=True)
            ours, our_factors = run_ours(shapes, dims, method, args.r, args.alpha, args.seed,
                                         peft_names if exact else [])
            print(f"{method}: ours {ours['wall_s']} s; PEFT on {len(peft_names)} layers ...", flush=True)
            peft, peft_factors = run_peft(args, method, peft_names, tmp)
            total, estimated = set_time(peft, shapes)
            cpu = set_time(peft, shapes, "cpu_s")[0]
            methods[method] = {"ours": ours, "peft": peft, "peft_set_time_s": total, "peft_set_cpu_s": cpu,
                               "peft_set_time_estimated": estimated,
                               "wall_ratio_peft_over_ours": round(total / ours["wall_s"], 2),
                               "cpu_ratio_peft_over_ours": round(cpu / sum(ours["cpu_s_per_rank"]), 2)}
            if exact:
                methods[method]["factor_agreement_vs_peft"] = factor_agreement(our_factors, peft_factors)
            print(f"{method}: PEFT {total} s{' (estimated)' if estimated else ''}", flush=True)
    result = {
        "benchmark": "PiSSA init: parallel_adapters at TP=2 on gloo vs PEFT on the full matrices (one process)",
        "metadata": {
            **bl.run_metadata(load_start), "load_average_1_5_15_end": bl.load_average(),
            "shapes": {n: list(s) for n, s in shapes.items()}, "r": args.r, "lora_alpha": args.alpha,
            "dtype": "float32", "tensor_parallel": TP, "backend": "gloo", "threads_per_rank": 1,
            "peft_threads": args.peft_threads,
            "weights": f"synthetic: planted rank {PLANTED}, singular values ~ 1/j, Gaussian floor at half the "
                       "last planted one, entry std 0.02; tiles of 256 x 256 seeded by (seed, layer, tile)",
            "peft_exact_layers": (("one layer of each shape (q_proj, k_proj, gate_proj, down_proj): torch.linalg.svd "
                                   "of the full set is too slow on 2 shared cores; the set's time is the sum of q, q, k, "
                                   "k, gate, gate, down") if args.peft_exact_layers == "one-per-shape"
                                  else "all seven layers"),
            "timing": "wall time of get_adapter_model / get_peft_model (injection + decomposition + residual); "
                      "ours: the slower rank, both started after a barrier; per_layer: the decomposition of each "
                      "layer (ours: slower rank; PEFT: LoraLayer.pissa_init)",
            "memory": "VmHWM of the process (peak_rss_mb) and its peak during the init minus the RSS just before "
                      "it (init_extra_peak_mb; the peak is reset through /proc/self/clear_refs); ru_maxrss too",
            "bytes": "payload bytes this rank passes to each collective during the init (tests/harness/counting), "
                     "identical on both ranks (checked); PEFT runs in one process: none",
            "factor_agreement": "exact PiSSA only: max |ours - PEFT| / max |PEFT| over A and B per layer, each "
                                "singular pair's sign aligned (PEFT keeps LAPACK's signs)",
        },
        "methods": methods,
    }
    result["metadata"]["runtime_s"] = round(time.monotonic() - started, 1)
    result["markdown_table"] = table = markdown_table(result)
    bl.write_result(args.out, result)
    print(table)
    print(f"load average start {result['metadata']['load_average_1_5_15_start']} "
          f"end {result['metadata']['load_average_1_5_15_end']}")
    print(f"wrote {args.out} in {result['metadata']['runtime_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
