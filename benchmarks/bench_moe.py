#!/usr/bin/env python
"""MoE layer benchmark: frozen base vs ours (LoRA on attention and every routed expert), EP=2.

One Megatron MoE transformer layer (build_gpt, num_layers=1: RMSNorm, GQA, RoPE, a top-k router
over SequentialMLP experts, the "allgather" token dispatcher) at expert parallelism 2 on 2 gloo CPU
ranks (TP=1, so the dense part is data-parallel over the same 2 ranks; expert-DP is 1), 1 thread
per rank, fp32.  Each rank runs its own micro-batch (a different slice of tokens per DP rank) and
its own forward+backward step (loss = cross-entropy of the full-vocabulary logits).  Variants,
built side by side in the same two processes and timed round-robin (the start variant rotates every
repeat), as in bench_layers.py:

1. frozen: the base model, everything frozen except the word embedding;
2. ours:   parallel_adapters LoRA on linear_qkv, linear_proj and every expert's linear_fc1 and
           linear_fc2 (the router stays frozen).

Per variant it records the collectives each rank issues per forward+backward step (calls and
payload bytes per op, counted exactly by tests/harness/counting, checked identical on both ranks
and every step), the step wall time (per repeat the slower rank), both ranks' process CPU time,
and the collectives of one optimizer step's gradient reduction: for ours `finalize_grads(
data_parallel=True)` (the TP-partial sums, none at TP=1, then dense grads over DP and expert
grads over expert-DP); for frozen the one DP all-reduce of the embedding gradient that a plain-DP
trainer needs (done here with the library's coalesced all-reduce, for comparison).

    python benchmarks/bench_moe.py --out benchmarks/results/moe.json

bench_layers.py runs the same measurement as its MoE row (`--moe`, `--moe-only`).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from benchmarks import bench_layers as bl  # noqa: E402

VARIANTS = ("frozen", "ours")
TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
VOCAB = 256
EP = 2


# ------------------------------------------------------------------------------------------------
# Worker side (runs on the 2 gloo ranks of tests.harness.pool.WorkerPool)
# ------------------------------------------------------------------------------------------------

def _settings(shape: dict):
    from parallel_adapters.mcore.gpt import GPTSettings

    return GPTSettings(
        num_layers=1, hidden_size=shape["hidden"], ffn_hidden_size=shape["expert_ffn"],
        num_attention_heads=shape["heads"], num_query_groups=shape["query_groups"],
        vocab_size=VOCAB, max_position_embeddings=max(shape["seq"], 128),
        num_moe_experts=shape["experts"], moe_router_topk=shape["topk"],
        moe_ffn_hidden_size=shape["expert_ffn"],
    )


def _setup():
    import torch

    from parallel_adapters.mcore import compat, cpu

    torch.set_num_threads(1)
    bl._quiet()
    cpu.enable_cpu_mode()
    return compat.initialize_model_parallel(1, 1, expert_parallel=EP)


def _fresh_base(shape: dict):
    from parallel_adapters.mcore import cpu
    from parallel_adapters.mcore.gpt import build_gpt

    cpu.model_parallel_seed(1234)
    return build_gpt(_settings(shape))


def _build_frozen(shape: dict, groups):
    from parallel_adapters.distributed import collectives

    base = _fresh_base(shape)
    for p in base.parameters():
        p.requires_grad_(False)
    emb = base.embedding.word_embeddings.weight
    emb.requires_grad_(True)

    def reduce_embedding() -> None:  # what a plain-DP trainer does once per optimizer step
        collectives.all_reduce_coalesced_([emb.grad], groups.dp_group)
        emb.grad.div_(groups.dp_size)

    return base, reduce_embedding


def _build_ours(shape: dict, groups):
    from functools import partial

    from parallel_adapters import LoraConfig, get_adapter_model

    adapter = get_adapter_model(_fresh_base(shape), LoraConfig(
        r=shape["r"], lora_alpha=2 * shape["r"], target_modules=TARGETS), groups=groups)
    adapter.model.embedding.word_embeddings.weight.requires_grad_(True)
    return adapter.model, partial(adapter.finalize_grads, data_parallel=True)


def _batch(shape: dict, dp_rank: int):
    import torch

    g = torch.Generator().manual_seed(7 + dp_rank)
    tokens = torch.randint(0, VOCAB, (shape["batch"], shape["seq"] + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def bench_job(shape: dict, warmup: int, repeats: int) -> dict:
    """Build both variants, check one step of each, then time them round-robin."""
    import torch

    groups = _setup()
    input_ids, labels = _batch(shape, groups.dp_rank)
    builders = {"frozen": _build_frozen, "ours": _build_ours}
    models, trainable, losses, expert_params = {}, {}, {}, {}
    for name in VARIANTS:
        model, finalize = builders[name](shape, groups)
        bl._zero_grads(model)
        loss = bl._loss(model, input_ids, labels)
        loss.backward()
        losses[name] = loss.item()
        models[name] = (model, finalize)
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        trainable[name] = sum(p.numel() for _, p in params)
        expert_params[name] = sum(p.numel() for n, p in params if "local_experts" in n)
    records = {n: [] for n in VARIANTS}
    gc.collect()
    gc.disable()  # no collector pauses inside timed steps
    try:
        for rep in range(warmup + repeats):
            k = rep % len(VARIANTS)
            for name in VARIANTS[k:] + VARIANTS[:k]:
                model, finalize = models[name]
                rec = bl._timed_step(model, finalize, lambda m: bl._loss(m, input_ids, labels))
                rec["warmup"] = rep < warmup
                records[name].append(rec)
    finally:
        gc.enable()
    torch.distributed.barrier()
    return {"records": records, "errors": {}, "trainable_params": trainable, "losses": losses,
            "expert_trainable_params": expert_params}


# ------------------------------------------------------------------------------------------------
# Driver side
# ------------------------------------------------------------------------------------------------

DEFAULT_SHAPE = dict(hidden=512, experts=8, topk=2, expert_ffn=1024, heads=8, query_groups=4, seq=256, batch=2, r=16)


def moe_shape(**kw) -> dict:
    """The MoE layer's shape record (DEFAULT_SHAPE updated with `kw`)."""
    shape = dict(DEFAULT_SHAPE, **kw)
    if shape["experts"] % EP:
        raise ValueError(f"experts={shape['experts']} must divide by EP={EP}")
    return dict(shape, vocab=VOCAB, num_layers=1, ep=EP, tp=1, dp=2, expert_dp=1, moe=True)


def measure(pool, shape: dict, warmup: int, repeats: int) -> dict:
    """Both variants timed on the pool's 2 ranks; the size record of bench_layers.py's JSON (its
    `_summarise`) plus the expert adapter parameters per rank."""
    rank_results = pool.run(bench_job, shape, warmup, repeats, timeout=900)
    size = bl._summarise(rank_results, shape, VARIANTS)
    for name in VARIANTS:
        size["variants"][name]["expert_trainable_params_per_rank"] = rank_results[0]["expert_trainable_params"][name]
    return size


def label(s: dict) -> str:
    return (f"MoE h{s['hidden']} {s['experts']}e top{s['topk']} effn{s['expert_ffn']} s{s['seq']} "
            f"b{s['batch']} r{s['r']} EP{EP}")


def markdown_table(size: dict) -> str:
    label_ = label(size["shape"])
    rows = ["| shape | variant | collectives/step | MB/step | grad reduction per optimizer step "
            "| step time ms | time vs frozen | CPU time vs frozen |",
            "|---|---|---|---|---|---|---|---|"]
    frozen = size["variants"]["frozen"]
    for name, v in size["variants"].items():
        fin = v["finalize_grads"]["collectives"]
        fin_txt = ", ".join(f"{c['calls']} {op} ({c['bytes'] / 2**20:.3f} MB)" for op, c in fin.items()) or "none"
        paired = bl._paired(v, frozen, "step_times_ms")
        cpu = v["cpu_time_ms_median"] / frozen["cpu_time_ms_median"]
        rows.append(f"| {label_} | {name} | {v['total_calls']} | {v['total_bytes'] / 2**20:.3f} | {fin_txt} | "
                    f"{v['step_time_ms_median']:.1f} | {paired:.3f} | {cpu:.3f} |")
    return "\n".join(rows)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "benchmarks", "results", "moe.json"))
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--expert-ffn", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--query-groups", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2, help="rows per rank (each DP rank its own)")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=16, help="timed repeats per variant (>= 6)")
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    if args.repeats < 6:
        parser.error("--repeats must be >= 6")
    if args.experts % EP:
        parser.error(f"--experts must divide by EP={EP}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    from tests.harness.pool import WorkerPool

    os.environ.setdefault("PYTHONWARNINGS", "ignore:Transformer Engine and Apex are not installed")
    started = time.monotonic()
    load_start = bl.load_average()
    shape = moe_shape(hidden=args.hidden, experts=args.experts, topk=args.topk, expert_ffn=args.expert_ffn,
                      heads=args.heads, query_groups=args.query_groups, seq=args.seq, batch=args.batch, r=args.r)
    with WorkerPool(2) as pool:
        size = measure(pool, shape, args.warmup, args.repeats)
    result = {
        "benchmark": "MoE layer: frozen base vs parallel_adapters expert LoRA, EP=2 on gloo",
        "metadata": {
            **bl.run_metadata(load_start), "load_average_1_5_15_end": bl.load_average(),
            "ranks": 2, "tensor_parallel": 1, "expert_parallel": EP, "data_parallel": 2,
            "expert_data_parallel": 1, "token_dispatcher": "allgather", "backend": "gloo",
            "threads_per_rank": 1, "dtype": "float32", "warmup": args.warmup, "repeats": args.repeats,
            "timing": "as bench_layers.py: step time = per repeat the slower rank's forward+backward "
                      "wall time (barrier before each), median over the timed repeats; variants "
                      "interleaved round-robin; gc disabled while timing; ratios.*.time = median over "
                      "rounds of variant/frozen; cpu_time = ratio of median CPU times (both ranks)",
            "finalize_grads": "per optimizer step, counted separately from the step: ours "
                              "finalize_grads(data_parallel=True); frozen: one coalesced DP all-reduce "
                              "of the embedding gradient (what a plain-DP trainer needs)",
            "bytes": "payload bytes this rank passes to each collective (tests/harness/counting); "
                     "identical on both ranks and every step (checked)",
            "targets": TARGETS,
        },
        "sizes": [size],
    }
    result["metadata"]["runtime_s"] = round(time.monotonic() - started, 1)
    result["markdown_table"] = table = markdown_table(size)
    bl.write_result(args.out, result)
    print(table)
    print(f"ratios {json.dumps(size['ratios'])}")
    print(f"load average start {result['metadata']['load_average_1_5_15_start']} "
          f"end {result['metadata']['load_average_1_5_15_end']}")
    print(f"wrote {args.out} in {result['metadata']['runtime_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
