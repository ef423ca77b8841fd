#!/usr/bin/env python
"""Adapter-layer benchmark (docs/design.md section 9): frozen base vs ours (LoRA, DoRA) vs PEFT's LoraParallelLinear.

One Llama-style Megatron layer (build_gpt, num_layers=1: RMSNorm, GQA, SwiGLU, RoPE) at TP=2 on
2 gloo CPU ranks (1 thread each), fp32.  Per forward+backward step of one micro-batch (loss =
cross-entropy of the full-vocabulary logits) it records, for each variant:

- the collectives each rank issues (calls and payload bytes per op, counted exactly by
  tests/harness/counting, whose wrappers are installed before megatron is imported);
- the step time: per repeat the slower rank's wall time, median over the timed repeats; the
  ratio to the frozen base is the median over repeats of variant/frozen within the same
  round-robin round; and the process CPU time of both ranks (the steadiest figure on a shared
  machine, where wall time also measures whoever else is running).

Variants (every one keeps the word embedding trainable, so backward runs through every layer):

1. frozen: the base model, everything frozen except the word embedding;
2. ours:   parallel_adapters LoRA on linear_qkv, linear_proj, linear_fc1, linear_fc2; plus the
           collectives and time of `finalize_grads()` (once per optimizer step);
3. peft:   PEFT 0.21.2 LoraParallelLinear on the same linears, with the minimal monkey-patches of
           benchmarks/_peft_megatron_fixes.py (each one recorded, with the error it fixes);
4. dora:   ours with use_dora=True (DoRA: the magnitude, the row norms inside the row layers' reductions);
5. peft-dora: PEFT's LoraParallelLinear with use_dora=True (it refuses DoRA: recorded as not running);
6. ia3, loha, lokr: ours with that kind on the same linears (IA3: linear_fc2 feedforward, linear_qkv's
           k/v parts; LoHa/LoKr: r and alpha = 2r, PEFT's default init), and peft-ia3/-loha/-lokr: PEFT's
           IA3/LoHa/LoKr get_peft_model on the Megatron layer (recorded as not running where it refuses).
           Not in the default run: `--variants ia3,peft-ia3,loha,peft-loha,lokr,peft-lokr`.
7. linear-frozen, linear-peft-<kind>, linear-ours-<kind>: a timing reference for each kind row
           timed (ours: LoRA, dora, ia3, loha, lokr): the four target linears as plain, unsharded
           nn.Linear layers of the layer's full shapes (no bias, as Megatron's), each on its own
           input of the same tokens (both ranks alike, no collectives), frozen with the inputs'
           gradients, vs PEFT's own layer of that kind on them (its nn.Linear path, which every PEFT
           kind supports) and vs ours on them (world size 1, the replicated host).  "PEFT vs
           nn.Linear frozen" is set beside "ours vs frozen" from the same run (`kind_ratios`); the
           Megatron layer's frozen step also holds attention, norms and the logits, the nn.Linear
           stack only the four matmuls, so the like-for-like pair is linear-ours vs linear-peft.
           Timed at the first size only (they do not depend on sequence parallelism); off with
           --no-linear-reference.

8. the MoE layer row (`--moe`, or `--moe-only` without the dense sizes): one MoE layer (GQA
           attention, a top-2 router over 8 SwiGLU experts, the allgather dispatcher) at expert
           parallelism 2 on the same two ranks, frozen vs ours (LoRA on linear_qkv, linear_proj and
           every expert's linear_fc1 / linear_fc2), with the collectives and bytes per step and of one
           optimizer step's gradient reduction; benchmarks/bench_moe.py's job and summary.

The variants are built side by side in the same two processes and timed round-robin (the start
variant rotates every repeat), so machine noise hits all of them alike.  Sizes: hidden 1024, then
hidden 1024 with sequence parallelism, then hidden 2048 (skipped if the --time-budget would be
exceeded).  Writes JSON (with metadata) and prints a markdown table for benchmarks/README.md.

    python benchmarks/bench_layers.py --out benchmarks/results/layers.json
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

VARIANTS = ("frozen", "ours", "peft", "dora", "peft-dora", "ia3", "peft-ia3", "loha", "peft-loha", "lokr",
            "peft-lokr")
DEFAULT_VARIANTS = VARIANTS[:5]
LINEAR_KINDS = {"ours": "lora", "dora": "dora", "ia3": "ia3", "loha": "loha", "lokr": "lokr"}
"""Our variant -> the PEFT kind of its nn.Linear timing reference (`linear-peft-<kind>`)."""
TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
VOCAB = 256
TP = 2
PEFT_SP_NOTE = (
    "PEFT's LoraParallelLinear ignores sequence parallelism (docs/design.md section 2: the replicated "
    "factor's gradient is never summed over TP), so its sequence-parallel row is timed for "
    "reference only; its training there is not equivalent to TP=1 (not checked by this benchmark)")


# ------------------------------------------------------------------------------------------------
# Worker side (runs on the 2 gloo ranks of tests.harness.pool.WorkerPool)
# ------------------------------------------------------------------------------------------------

def _quiet() -> None:
    import warnings

    warnings.filterwarnings("ignore", message=".*gloo.*")
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.distributed")
    warnings.filterwarnings("ignore", category=UserWarning, module="megatron")
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")


def _settings(shape: dict):
    from parallel_adapters.mcore.gpt import GPTSettings

    return GPTSettings(
        num_layers=1, hidden_size=shape["hidden"], ffn_hidden_size=shape["ffn"],
        num_attention_heads=shape["heads"], num_query_groups=shape["query_groups"],
        vocab_size=VOCAB, max_position_embeddings=max(shape["seq"], 128),
        sequence_parallel=shape["sequence_parallel"],
    )


def _setup(shape: dict):
    import torch

    from parallel_adapters.mcore import cpu
    from parallel_adapters.mcore.compat import initialize_model_parallel

    torch.set_num_threads(1)
    _quiet()
    cpu.enable_cpu_mode()
    initialize_model_parallel(TP, 1)


def _fresh_base(shape: dict):
    from parallel_adapters.mcore import cpu
    from parallel_adapters.mcore.gpt import build_gpt

    cpu.model_parallel_seed(1234)
    return build_gpt(_settings(shape))


def _train_embedding(model) -> None:
    model.embedding.word_embeddings.weight.requires_grad_(True)


def _build_frozen(shape: dict):
    base = _fresh_base(shape)
    for p in base.parameters():
        p.requires_grad_(False)
    _train_embedding(base)
    return base, None


def _build_ours(shape: dict, use_dora: bool = False):
    from parallel_adapters import LoraConfig, get_adapter_model

    adapter = get_adapter_model(_fresh_base(shape), LoraConfig(
        r=shape["r"], lora_alpha=2 * shape["r"], target_modules=TARGETS, use_dora=use_dora))
    _train_embedding(adapter.model)
    return adapter.model, adapter.finalize_grads


def _kind_config(kind: str, r: int, peft: bool):
    """The IA3 / LoHa / LoKr config of the kind rows: ours (parallel_adapters) or PEFT's."""
    import parallel_adapters
    import peft as peft_lib

    lib = peft_lib if peft else parallel_adapters
    if kind == "ia3":
        extra = {} if peft else {"fused_parts": {"linear_qkv": ("k", "v")}}
        return lib.IA3Config(target_modules=TARGETS, feedforward_modules=["linear_fc2"], **extra)
    cls = lib.LoHaConfig if kind == "loha" else lib.LoKrConfig
    return cls(r=r, alpha=2 * r, target_modules=TARGETS)


def _build_kind(shape: dict, kind: str):
    from parallel_adapters import get_adapter_model

    adapter = get_adapter_model(_fresh_base(shape), _kind_config(kind, shape["r"], peft=False))
    _train_embedding(adapter.model)
    return adapter.model, adapter.finalize_grads


def _build_peft_kind(shape: dict, kind: str):
    from peft import get_peft_model

    base = _fresh_base(shape)
    model = get_peft_model(base, _kind_config(kind, shape["r"], peft=True))
    _train_embedding(base)
    return model, None


def _linear_stack(shape: dict):
    """The layer's four target linears as plain nn.Linear of their full (unsharded) shapes, frozen;
    the module runs each on its own input (tokens x in) and sums the mean squares."""
    import torch
    from torch import nn

    class LinearStack(nn.Module):
        def __init__(self, linears: dict):
            super().__init__()
            self.linears = nn.ModuleDict(linears)

        def forward(self, inputs: dict):
            return sum(self.linears[name](x).square().mean() for name, x in inputs.items())

    head_dim = shape["hidden"] // shape["heads"]
    h, f = shape["hidden"], shape["ffn"]
    sizes = {"linear_qkv": (h, (shape["heads"] + 2 * shape["query_groups"]) * head_dim),
             "linear_proj": (h, h), "linear_fc1": (h, 2 * f), "linear_fc2": (f, h)}
    torch.manual_seed(1234)
    stack = LinearStack({name: nn.Linear(i, o, bias=False) for name, (i, o) in sizes.items()})
    for p in stack.parameters():
        p.requires_grad_(False)
    return stack


def _linear_inputs(shape: dict, model) -> dict:
    import torch

    g = torch.Generator().manual_seed(11)
    tokens = shape["seq"] * shape["batch"]
    return {name: torch.randn(tokens, layer.in_features, generator=g).requires_grad_()
            for name, layer in model.linears.items()}


def _build_linear_frozen(shape: dict):
    return _linear_stack(shape), None


def _build_linear_peft(shape: dict, kind: str):
    """PEFT's own layer of `kind` on the plain nn.Linear stack (ours' settings: r, alpha = 2r)."""
    import peft

    r, stack = shape["r"], _linear_stack(shape)
    if kind in ("lora", "dora"):
        config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, use_dora=kind == "dora")
    else:
        config = _kind_config(kind, r, peft=True)
    return peft.get_peft_model(stack, config), None


def _build_linear_ours(shape: dict, kind: str):
    """Ours (world size 1) of `kind` on the plain nn.Linear stack, with _build_linear_peft's settings."""
    from parallel_adapters import IA3Config, LoraConfig, ParallelGroups, get_adapter_model

    r = shape["r"]
    if kind in ("lora", "dora"):
        config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, use_dora=kind == "dora")
    elif kind == "ia3":  # a plain linear_qkv has no fused parts: every row scaled, as PEFT's
        config = IA3Config(target_modules=TARGETS, feedforward_modules=["linear_fc2"], fused_parts={})
    else:
        config = _kind_config(kind, r, peft=False)
    return get_adapter_model(_linear_stack(shape), config, groups=ParallelGroups.single()).model, None


def _peft_model(base, r: int, use_dora: bool = False):
    import copy

    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    megatron_config = copy.copy(base.config)  # PEFT sets params_dtype on the config it gets
    config = PeftLoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS,
                            megatron_config=megatron_config, megatron_core="megatron.core", use_dora=use_dora)
    model = get_peft_model(base, config)
    _train_embedding(base)
    return model


def _build_peft(shape: dict, use_dora: bool = False):
    from benchmarks import _peft_megatron_fixes as fixes

    fixes.apply_fixes()
    model = _peft_model(_fresh_base(shape), shape["r"], use_dora)
    n_parallel = sum(type(m).__name__ == "LoraParallelLinear" for m in model.modules())
    if n_parallel != len(TARGETS):
        raise RuntimeError(f"expected {len(TARGETS)} LoraParallelLinear modules, got {n_parallel}")
    return model, None


def _batch(shape: dict):
    import torch

    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (shape["batch"], shape["seq"] + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _loss(model, input_ids, labels):
    import torch.nn.functional as F

    from parallel_adapters.mcore.gpt import gpt_logits

    logits = gpt_logits(model, input_ids)
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


def _error_string(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def peft_probe_job() -> dict:
    """Apply the PEFT fixes one at a time on a tiny TP=2 GPT and record the exact error that each
    remaining bug raises (so the JSON shows what every fix is for).  Leaves all fixes applied."""
    import torch

    from benchmarks import _peft_megatron_fixes as fixes

    shape = dict(hidden=64, ffn=128, heads=4, query_groups=2, seq=16, batch=2, r=4, sequence_parallel=False)
    _setup(shape)
    input_ids, labels = _batch(shape)
    steps = []
    for applied in range(0, 4):
        if applied:
            fixes.apply_fix(applied)
        try:
            model = _peft_model(_fresh_base(shape), shape["r"])
            loss = _loss(model, input_ids, labels)
            loss.backward()
            result = f"runs (loss {loss.item():.6f})"
        except Exception as exc:  # noqa: BLE001  - recording the failure is the point
            result = _error_string(exc)
        steps.append({"fixes_applied": list(range(1, applied + 1)), "result": result})
    torch.distributed.barrier()
    return {"steps": steps}


def _zero_grads(model) -> None:
    for p in model.parameters():
        p.grad = None


def _timed_step(model, finalize, loss_of) -> dict:
    import torch.distributed as dist

    from tests.harness import counting

    _zero_grads(model)
    dist.barrier()
    c0, t0 = time.process_time(), time.perf_counter()
    with counting.counted() as step:
        loss_of(model).backward()
    t1, c1 = time.perf_counter(), time.process_time()
    out = {"time_s": t1 - t0, "cpu_s": c1 - c0, "calls": dict(step.calls), "bytes": dict(step.bytes)}
    if finalize is not None:
        with counting.counted() as fin:
            finalize()
        out["finalize_time_s"] = time.perf_counter() - t1
        out["finalize_calls"], out["finalize_bytes"] = dict(fin.calls), dict(fin.bytes)
    return out


def bench_job(shape: dict, warmup: int, repeats: int, variants: tuple = DEFAULT_VARIANTS) -> dict:
    """Build the variants, check one step of each, then time them round-robin."""
    import torch

    _setup(shape)
    input_ids, labels = _batch(shape)
    builders = {"frozen": _build_frozen, "ours": _build_ours, "peft": _build_peft,
                "dora": lambda s: _build_ours(s, True), "peft-dora": lambda s: _build_peft(s, True)}
    for kind in ("ia3", "loha", "lokr"):
        builders[kind] = lambda s, k=kind: _build_kind(s, k)
        builders[f"peft-{kind}"] = lambda s, k=kind: _build_peft_kind(s, k)
    builders["linear-frozen"] = _build_linear_frozen
    for kind in LINEAR_KINDS.values():
        builders[f"linear-peft-{kind}"] = lambda s, k=kind: _build_linear_peft(s, k)
        builders[f"linear-ours-{kind}"] = lambda s, k=kind: _build_linear_ours(s, k)
    models, errors, trainable, losses = {}, {}, {}, {}
    linear_inputs = None
    for name in variants:
        try:
            model, finalize = builders[name](shape)
            if name.startswith("linear-"):
                stack = model.base_model.model if hasattr(model, "base_model") else model
                linear_inputs = linear_inputs or _linear_inputs(shape, stack)
                loss_of = lambda m: m(linear_inputs)  # noqa: E731
            else:
                loss_of = lambda m: _loss(m, input_ids, labels)  # noqa: E731
            # One untimed step: a variant that does not run fails here, on every rank alike.
            _zero_grads(model)
            loss = loss_of(model)
            loss.backward()
            losses[name] = loss.item()
            models[name] = (model, finalize, loss_of)
            trainable[name] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        except Exception as exc:  # noqa: BLE001
            errors[name] = _error_string(exc)
    names = [n for n in variants if n in models]
    records = {n: [] for n in names}
    gc.collect()
    gc.disable()  # no collector pauses inside timed steps
    try:
        for rep in range(warmup + repeats):
            k = rep % len(names)
            for name in names[k:] + names[:k]:
                model, finalize, loss_of = models[name]
                if name.startswith("linear-"):
                    for x in linear_inputs.values():
                        x.grad = None
                rec = _timed_step(model, finalize, loss_of)
                rec["warmup"] = rep < warmup
                records[name].append(rec)
    finally:
        gc.enable()
    torch.distributed.barrier()
    return {"records": records, "errors": errors, "trainable_params": trainable, "losses": losses}


# ------------------------------------------------------------------------------------------------
# Driver side
# ------------------------------------------------------------------------------------------------

def _ffn_default(hidden: int) -> int:
    # Llama's 8/3 * hidden rounded like 2816 for 1024 (2.75 x hidden), to a multiple of 64.
    return -(-int(2.75 * hidden) // 64) * 64


def _summarise(rank_results: list[dict], shape: dict, names: tuple = DEFAULT_VARIANTS) -> dict:
    rank0 = rank_results[0]
    variants = {}
    for name in names:
        if name in rank0["errors"]:
            variants[name] = {"runs": False, "error": rank0["errors"][name]}
            continue
        per_rank = [r["records"][name] for r in rank_results]
        timed = [i for i, rec in enumerate(per_rank[0]) if not rec["warmup"]]
        step_ms = [1e3 * max(recs[i]["time_s"] for recs in per_rank) for i in timed]
        cpu_ms = [1e3 * sum(recs[i]["cpu_s"] for recs in per_rank) for i in timed]
        first = per_rank[0][timed[0]]
        # Counts are exact: every step and every rank must issue the same collectives.
        for recs in per_rank:
            for rec in recs:
                if rec["calls"] != first["calls"] or rec["bytes"] != first["bytes"]:
                    raise RuntimeError(f"{name}: collectives differ between steps or ranks")
        ops = {op: {"calls": first["calls"][op], "bytes": first["bytes"].get(op, 0)} for op in sorted(first["calls"])}
        entry = {
            "runs": True,
            "collectives_per_step": ops,
            "total_calls": sum(first["calls"].values()),
            "total_bytes": sum(first["bytes"].values()),
            "step_time_ms_median": statistics.median(step_ms),
            "step_time_ms_min": min(step_ms),
            "step_times_ms": [round(t, 3) for t in step_ms],
            "cpu_time_ms_median": statistics.median(cpu_ms),
            "cpu_times_ms": [round(t, 3) for t in cpu_ms],
            "trainable_params_per_rank": rank0["trainable_params"][name],
            "first_loss": rank0["losses"][name],
        }
        if "finalize_calls" in first:
            fin_ms = [1e3 * max(recs[i]["finalize_time_s"] for recs in per_rank) for i in timed]
            with_fin = [1e3 * max(recs[i]["time_s"] + recs[i]["finalize_time_s"] for recs in per_rank) for i in timed]
            entry["finalize_grads"] = {
                "collectives": {op: {"calls": first["finalize_calls"][op], "bytes": first["finalize_bytes"].get(op, 0)}
                                for op in sorted(first["finalize_calls"])},
                "time_ms_median": statistics.median(fin_ms),
            }
            entry["step_plus_finalize_time_ms_median"] = statistics.median(with_fin)
            entry["finalize_grads"]["is_one_all_reduce"] = first["finalize_calls"] == {"all_reduce": 1}
        variants[name] = entry
    return {"shape": shape, "variants": variants, "ratios": _ratios(variants), "kind_ratios": _kind_ratios(variants)}


def _paired(v: dict, frozen: dict, key: str) -> float:
    """Median over repeats of (variant / frozen) within the same round-robin round."""
    return statistics.median(a / b for a, b in zip(v[key], frozen[key]))


def _ratios(variants: dict) -> dict:
    frozen = variants["frozen"]
    out = {}
    if not frozen.get("runs"):
        return out
    for name in [n for n in variants if n != "frozen" and not n.startswith("linear-")]:
        v = variants[name]
        if not v.get("runs"):
            out[f"{name}_vs_frozen"] = None
            continue
        r = {
            "time": _paired(v, frozen, "step_times_ms"),
            "time_wall_ratio_of_medians": v["step_time_ms_median"] / frozen["step_time_ms_median"],
            "time_wall_ratio_of_minimums": v["step_time_ms_min"] / frozen["step_time_ms_min"],
            "cpu_time": v["cpu_time_ms_median"] / frozen["cpu_time_ms_median"],
            "cpu_time_paired_median": _paired(v, frozen, "cpu_times_ms"),
            "calls": v["total_calls"] / frozen["total_calls"],
            "bytes": v["total_bytes"] / frozen["total_bytes"],
            "extra_calls": v["total_calls"] - frozen["total_calls"],
            "extra_bytes": v["total_bytes"] - frozen["total_bytes"],
        }
        if "step_plus_finalize_time_ms_median" in v:
            r["time_wall_incl_finalize_ratio_of_medians"] = (
                v["step_plus_finalize_time_ms_median"] / frozen["step_time_ms_median"])
        out[f"{name}_vs_frozen"] = r
    return out


def _time_ratios(v: dict, frozen: dict) -> dict:
    return {"time": _paired(v, frozen, "step_times_ms"),
            "cpu_time": v["cpu_time_ms_median"] / frozen["cpu_time_ms_median"],
            "cpu_time_paired_median": _paired(v, frozen, "cpu_times_ms")}


def _kind_ratios(variants: dict) -> dict:
    """Per kind: ours (Megatron, TP=2) vs the frozen layer, and PEFT's own layer on the plain
    nn.Linear stack vs that stack frozen, both from this run (None where a side did not run)."""
    out = {}
    frozen, linear_frozen = variants.get("frozen", {}), variants.get("linear-frozen", {})
    for ours, kind in LINEAR_KINDS.items():
        if ours not in variants and f"linear-peft-{kind}" not in variants:
            continue
        v, p, o = (variants.get(n, {}) for n in (ours, f"linear-peft-{kind}", f"linear-ours-{kind}"))
        lin = linear_frozen.get("runs")
        out[kind] = {
            "ours_vs_frozen": _time_ratios(v, frozen) if v.get("runs") and frozen.get("runs") else None,
            "peft_nn_linear_vs_nn_linear_frozen": _time_ratios(p, linear_frozen) if p.get("runs") and lin else None,
            "ours_nn_linear_vs_nn_linear_frozen": _time_ratios(o, linear_frozen) if o.get("runs") and lin else None,
        }
    return out


def _label(s: dict) -> str:
    if s.get("moe"):  # the MoE layer row (bench_moe.py's measurement)
        from benchmarks import bench_moe

        return bench_moe.label(s)
    return f"h{s['hidden']} ffn{s['ffn']} s{s['seq']} b{s['batch']} r{s['r']}" + (" SP" if s["sequence_parallel"] else "")


def kind_table(result: dict) -> str:
    """shape | kind | ours vs frozen (Megatron layer, TP=2) | PEFT's layer on nn.Linear vs frozen nn.Linear,
    each as paired wall time / CPU time ratios from the same run."""
    rows = ["| shape | kind | ours vs frozen (Megatron layer, TP=2): time / CPU "
            "| PEFT on nn.Linear vs frozen nn.Linear: time / CPU | ours on nn.Linear vs frozen nn.Linear: time / CPU |",
            "|---|---|---|---|---|"]
    for size in result["sizes"]:
        s = size["shape"]
        if s.get("moe"):  # its own table (bench_moe.markdown_table: the gradient reduction's bytes too)
            continue
        label = _label(s)
        for kind, r in size.get("kind_ratios", {}).items():
            cells = []
            for side in (r["ours_vs_frozen"], r["peft_nn_linear_vs_nn_linear_frozen"],
                         r["ours_nn_linear_vs_nn_linear_frozen"]):
                cells.append("n/a" if side is None else f"{side['time']:.3f} / {side['cpu_time']:.3f}")
            rows.append(f"| {label} | {kind} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def markdown_table(result: dict) -> str:
    """shape | variant | collectives/step | MB/step | step time ms (median wall) | time vs frozen
    (median over rounds of variant/frozen wall time within one round-robin round) | CPU time vs
    frozen (ratio of the median CPU times, both ranks summed: the steadiest figure on a shared
    machine, where wall time also measures who else is running)."""
    rows = ["| shape | variant | collectives/step | MB/step | step time ms | time vs frozen "
            "| CPU time vs frozen |",
            "|---|---|---|---|---|---|---|"]
    for size in result["sizes"]:
        s = size["shape"]
        label = _label(s)
        for name, v in size["variants"].items():
            frozen = size["variants"]["linear-frozen" if name.startswith("linear-") else "frozen"]
            if not v.get("runs"):
                rows.append(f"| {label} | {name} | does not run: {v['error'][:160]} | | | | |")
                continue
            calls = str(v["total_calls"])
            if "finalize_grads" in v:
                fin = sum(c["calls"] for c in v["finalize_grads"]["collectives"].values())
                calls += f" (+{fin} per optimizer step)"
            paired = _paired(v, frozen, "step_times_ms")
            cpu = v["cpu_time_ms_median"] / frozen["cpu_time_ms_median"]
            rows.append(f"| {label} | {name} | {calls} | {v['total_bytes'] / 2**20:.3f} | "
                        f"{v['step_time_ms_median']:.1f} | {paired:.3f} | {cpu:.3f} |")
    return "\n".join(rows)


def _versions() -> dict:
    from importlib.metadata import version

    out = {}
    for pkg in ("torch", "megatron-core", "peft", "transformers"):
        try:
            out[pkg] = version(pkg)
        except Exception:  # noqa: BLE001
            out[pkg] = None
    return out


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_metadata(load_start: list[float]) -> dict:
    """What every benchmark result's metadata opens with: when, the command, the versions, the
    machine and its load average when the run started (`load_average()` then)."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python"] + [os.path.relpath(sys.argv[0], REPO_ROOT)] + sys.argv[1:]),
        "versions": _versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15_start": load_start,
    }


def write_result(path: str, result: dict) -> None:
    """The result as indented JSON at `path` (its folder made if missing)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "benchmarks", "results", "layers.json"))
    parser.add_argument("--hidden", type=int, nargs="*", default=[1024, 2048],
                        help="hidden sizes, run in order; a later size is skipped when the time budget would be exceeded")
    parser.add_argument("--ffn", type=int, default=None, help="FFN size (default 2.75 x hidden, 2816 at 1024)")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--query-groups", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=16, help="timed repeats per variant (>= 6)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--sp-hidden", type=int, nargs="*", default=[1024],
                        help="hidden sizes also measured with sequence parallelism (run after the first "
                             "--hidden size; none: --sp-hidden with no value)")
    parser.add_argument("--time-budget", type=float, default=240.0,
                        help="seconds; a further size is skipped if its estimated time would exceed it")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS[1:]),
                        help=f"comma-separated, timed against frozen (always run); of {', '.join(VARIANTS[1:])}")
    parser.add_argument("--moe", action="store_true",
                        help="also the MoE layer row, after the dense sizes: a top-2 router over 8 experts at EP=2, "
                             "frozen vs ours (LoRA on attention and every expert; benchmarks/bench_moe.py's job)")
    parser.add_argument("--moe-only", action="store_true", help="only the MoE layer row (no dense sizes)")
    parser.add_argument("--no-linear-reference", action="store_true",
                        help="skip the nn.Linear timing references (linear-frozen, linear-peft-<kind>)")
    args = parser.parse_args(argv)
    picked = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(picked) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS[1:])}")
    args.variants = ("frozen",) + tuple(v for v in VARIANTS[1:] if v in picked)
    linear = [f"linear-{side}-{kind}" for ours, kind in LINEAR_KINDS.items() if ours in args.variants
              for side in ("peft", "ours")]
    if linear and not args.no_linear_reference:
        args.variants += ("linear-frozen", *linear)
    if args.repeats < 6:
        parser.error("--repeats must be >= 6")
    if args.moe_only:
        args.moe, args.hidden, args.sp_hidden = True, [], []
    return args


def _new_result(args: argparse.Namespace) -> dict:
    from benchmarks._peft_megatron_fixes import CONFIG_NOTES, FIXES

    return {
        "benchmark": "adapter layers: frozen base vs parallel_adapters LoRA and DoRA vs PEFT LoraParallelLinear",
        "metadata": {
            **run_metadata(load_average()),
            "ranks": TP, "tensor_parallel": TP, "backend": "gloo", "threads_per_rank": 1,
            "dtype": "float32", "warmup": args.warmup, "repeats": args.repeats,
            "timing": "step time = per repeat the slower rank's forward+backward wall time (barrier "
                      "before each step), median over the timed repeats; variants interleaved "
                      "round-robin with the start variant rotating; gc disabled while timing. "
                      "ratios.*.time = median over rounds of variant/frozen wall time within the same "
                      "round (paired); cpu_time = ratio of median process CPU times summed over both "
                      "ranks (steadiest on a shared machine); *_ratio_of_medians/_minimums as named",
            "loss": "cross-entropy (fp32) of gpt_logits (full vocab, gathered over TP)",
            "bytes": "payload bytes this rank passes to each collective (tests/harness/counting); "
                     "identical on both ranks and on every step (checked)",
            "targets": TARGETS,
            "variants": list(args.variants),
        },
        "peft_fixes": list(FIXES),
        "peft_config_notes": list(CONFIG_NOTES),
        "sizes": [],
        "skipped": [],
    }


def _configs(args: argparse.Namespace) -> list[tuple[int, bool]]:
    """(hidden, sequence_parallel) in run order: first size, its SP twins, then the larger sizes."""
    return ([(h, False) for h in args.hidden[:1]] + [(h, True) for h in args.sp_hidden]
            + [(h, False) for h in args.hidden[1:]])


def _run_all(pool, args: argparse.Namespace, result: dict, started: float) -> None:
    if "peft" in args.variants and _configs(args):  # what each LoraParallelLinear fix is for
        result["peft_unpatched_errors"] = pool.run(peft_probe_job, timeout=300)[0]["steps"]
    configs = _configs(args)
    steps = len(args.variants) * (args.warmup + args.repeats + 1)
    per_step_s = None
    for hidden, sp in configs:
        label = f"hidden {hidden}" + (" with sequence parallelism" if sp else "")
        elapsed = time.monotonic() - started
        if per_step_s is not None:
            estimate = per_step_s * (hidden / configs[0][0]) ** 2 * steps * 1.3 + 10  # + build time
            if elapsed + estimate > args.time_budget:
                note = (f"{label} skipped: estimated {estimate:.0f} s on top of {elapsed:.0f} s "
                        f"exceeds --time-budget {args.time_budget:.0f} s")
                result["skipped"].append(note)
                print(note, flush=True)
                continue
        shape = dict(hidden=hidden, ffn=args.ffn or _ffn_default(hidden), heads=args.heads,
                     query_groups=args.query_groups, seq=args.seq, batch=args.batch, r=args.r,
                     sequence_parallel=sp, vocab=VOCAB, num_layers=1, tp=TP)
        print(f"{label}: building and timing {len(args.variants)} variants ...", flush=True)
        t0 = time.monotonic()
        variants = args.variants if (hidden, sp) == configs[0] else tuple(
            v for v in args.variants if not v.startswith("linear-"))  # the nn.Linear references: first size only
        size = _summarise(pool.run(bench_job, shape, args.warmup, args.repeats, variants, timeout=1800),
                          shape, variants)
        size["wall_s"] = round(time.monotonic() - t0, 1)
        if sp and "peft" in args.variants:
            size["note"] = PEFT_SP_NOTE
        result["sizes"].append(size)
        if per_step_s is None:
            per_step_s = size["wall_s"] / steps
    if args.moe:
        from benchmarks import bench_moe

        shape = bench_moe.moe_shape(seq=args.seq, batch=args.batch, r=args.r)
        print(f"{bench_moe.label(shape)}: building and timing frozen, ours ...", flush=True)
        t0 = time.monotonic()
        size = bench_moe.measure(pool, shape, args.warmup, args.repeats)
        size["wall_s"] = round(time.monotonic() - t0, 1)
        size["note"] = ("MoE layer at EP=2 (TP=1, DP=2, expert-DP=1); finalize_grads: ours "
                        "finalize_grads(data_parallel=True), frozen the one DP all-reduce of the embedding "
                        "gradient a plain-DP trainer needs (bench_moe.py)")
        result["sizes"].append(size)
        result["moe_table"] = bench_moe.markdown_table(size)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    from tests.harness.pool import WorkerPool

    # Workers inherit this at start: hide megatron's "TE and Apex are not installed" import notices.
    os.environ.setdefault("PYTHONWARNINGS", "ignore:Transformer Engine and Apex are not installed")
    started = time.monotonic()
    result = _new_result(args)
    with WorkerPool(2) as pool:
        _run_all(pool, args, result, started)
    result["metadata"]["runtime_s"] = round(time.monotonic() - started, 1)
    result["markdown_table"] = table = markdown_table(result)
    result["kind_table"] = kinds = kind_table(result)
    result["metadata"]["load_average_1_5_15_end"] = load_average()
    write_result(args.out, result)
    print(table)
    print(kinds)
    for size in result["sizes"]:
        print(f"{_label(size['shape'])}: ratios {json.dumps(size['ratios'])}")
    print(f"wrote {args.out} in {result['metadata']['runtime_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
