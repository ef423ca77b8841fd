#!/usr/bin/env python
"""Prepared GPU check: the adapters on CUDA through megatron's own GPU path (one GPU, NCCL world 1).

    python3 benchmarks/bench_gpu.py --out gpu.json                     # GPU box (scripts/gpu_check.sh)
    python benchmarks/bench_gpu.py --smoke --out /tmp/gpu_smoke.json   # tiny timing shapes, any box

Sections (setup, layers_float64/32, gpt_float32, timing_bf16: see each function's docstring) catch
their own exceptions (traceback into the JSON); the JSON is rewritten after each, so a killed run
still leaves what it measured.  Without CUDA (smoke only) megatron needs mcore/cpu.py and gloo.
Exit code: 0 all checks pass; 1 a check failed or a correctness section crashed; 2 only timing crashed.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import socket
import statistics
import sys
import time
import traceback
import warnings
from typing import Any, Callable, Iterator

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FULL = dict(hidden=4096, ffn=14336, heads=32, groups=8, seq=4096, batch=1, vocab=256, r=16)
SMOKE = dict(hidden=128, ffn=352, heads=4, groups=2, seq=64, batch=1, vocab=256, r=4)
SEED = 1234
TP_NOTE = ("one GPU: TP>1 over NCCL needs one GPU per rank, so everything here runs at TP=1, PP=1; "
           "TP=2 / sequence-parallel equivalence is tested on CPU gloo ranks (tests/mcore/test_lora_gpt.py)")
CPU_REF_NOTE = ("reference = transformers LlamaForCausalLM, float64, CPU, with W + s B A merged in float64. "
                "megatron itself cannot run on the CPU in a CUDA process without mcore/cpu.py (it builds "
                "causal masks with device='cuda' and its attention buffer on torch.cuda.current_device())")
TIMING_NOTES = [
    "every variant keeps the word embedding trainable, so backward runs through the whole layer",
    "step = forward + fp32 cross-entropy of the full logits + backward (no optimizer), CUDA events",
    "megatron: local spec (unfused attention; fusions off as gpt_transformer_config sets them), softmax "
    "in fp32 (bf16=True from params_dtype); transformers: attention per --hf-attn",
    "PEFT adapts q/k/v and gate/up separately (one A each); ours the fused linear_qkv / linear_fc1 (one A): "
    "PEFT trains more parameters at the same r",
    "ours and hf_peft_lora: the defaults (autocast_adapter_dtype=True: fp32 factors, cast to bf16 where used); "
    "*_bf16_factors: autocast_adapter_dtype=False"]
_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - _T0:6.1f}s] {msg}", flush=True)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double().cpu() - b.detach().double().cpu()).abs().max())


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Report:
    """The JSON being built, plus whether a check failed or a section crashed."""

    def __init__(self, out: str, metadata: dict):
        self.out, self.data = out, {"metadata": metadata, "sections": {}, "checks_failed": []}
        self.failed = self.timing_crashed = False

    @contextlib.contextmanager
    def section(self, name: str, correctness: bool = True) -> Iterator[dict]:
        entry = self.data["sections"][name] = {"status": "running", "checks": {}}
        log(f"== {name}")
        t0 = time.monotonic()
        try:
            yield entry
            entry["status"] = "ok"
        except Exception:  # noqa: BLE001  - one broken part must not end the run
            entry["status"], entry["traceback"] = "error", traceback.format_exc()
            log(f"{name} CRASHED:\n{entry['traceback']}")
            self.failed = self.failed or correctness
            self.timing_crashed = self.timing_crashed or not correctness
        finally:
            entry["wall_s"] = round(time.monotonic() - t0, 2)
            log(f"{name}: {entry['status']} in {entry['wall_s']} s")
            self.save()

    def check(self, entry: dict, name: str, value: float, limit: float, op: str = "<=") -> None:
        ok = bool({"<=": value <= limit, ">=": value >= limit, "==": value == limit}[op])  # NaN fails
        entry["checks"][name] = {"value": value, "op": op, "limit": limit, "pass": ok}
        log(f"  {'ok  ' if ok else 'FAIL'} {name}: {value:.3g} {op} {limit:.3g}")
        if not ok:
            self.failed = True
            self.data["checks_failed"].append(name)

    def save(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.out)), exist_ok=True)
        with open(self.out + ".tmp", "w") as f:
            json.dump(self.data, f, indent=2, default=str)
        os.replace(self.out + ".tmp", self.out)


def no_tf32() -> str:
    """Full-precision fp32 matmuls for the fp32 references (bf16 timing is unaffected); torch >= 2.9
    has a new API for it and warns about the old one."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "ieee"
        return f"cuda.matmul.fp32_precision={matmul.fp32_precision}"
    matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    return "cuda.matmul.allow_tf32=False"


def reseed(seed: int = SEED) -> None:
    """Megatron's RNG tracker states (build_gpt's GPU init forks 'model-parallel-rng'): megatron's own
    CUDA seeding on a GPU; its CPU-mode twin only on the CPU-only smoke branch."""
    if torch.cuda.is_available():
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        from parallel_adapters.mcore import cpu

        cpu.model_parallel_seed(seed)


def setup(rep: Report, entry: dict) -> None:
    """torch.distributed at world size 1 (NCCL on a GPU), megatron's parallel state at TP=1, PP=1."""
    import torch.distributed as dist

    from parallel_adapters.mcore.compat import initialize_model_parallel

    with socket.socket() as sock:  # a free port, whatever else runs on the box
        sock.bind(("127.0.0.1", 0))
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(sock.getsockname()[1]), RANK="0", WORLD_SIZE="1")
    timeout = datetime.timedelta(seconds=120)
    if torch.cuda.is_available():
        torch.cuda.set_device(0)
        entry["fp32_matmul"] = no_tf32()
        dist.init_process_group("nccl", init_method="env://", rank=0, world_size=1, timeout=timeout)
        initialize_model_parallel(1, 1)
        reseed()
        entry.update(backend="nccl", seeding="megatron.core.tensor_parallel.model_parallel_cuda_manual_seed")
    else:
        # CPU-only smoke branch, never taken with CUDA (enable_cpu_mode refuses there anyway).
        from parallel_adapters.mcore import cpu

        cpu.enable_cpu_mode()
        dist.init_process_group("gloo", init_method="env://", rank=0, world_size=1, timeout=timeout)
        initialize_model_parallel(1, 1)
        reseed()
        entry.update(backend="gloo (CPU-only smoke, mcore/cpu.py mode)", seeding="mcore.cpu.model_parallel_seed")
    probe = torch.full((4,), 2.0, device=device())
    dist.all_reduce(probe)  # one real collective: a broken NCCL shows here, not in a later section
    sync()
    rep.check(entry, "world1_all_reduce", float((probe == 2.0).all()), 1.0, "==")
    entry.update(tp=1, pp=1, world_size=dist.get_world_size(), tp_note=TP_NOTE)


def check_layers(rep: Report, entry: dict, dtype: torch.dtype) -> None:
    """1a. The two wrappers vs y = x W^T + b + s (x A^T) B^T and its autograd, float64 on the CPU."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig

    from parallel_adapters import LoraConfig, get_adapter_model

    dev, f64 = device(), torch.float64
    hidden, out, r, seq, batch = 48, 80, 4, 6, 3
    cfg = TransformerConfig(num_layers=1, hidden_size=hidden, num_attention_heads=1, params_dtype=dtype,
                            use_cpu_initialization=dev.type == "cpu", gradient_accumulation_fusion=False)
    init = lambda w: torch.nn.init.normal_(w, std=0.02)  # noqa: E731  (overwritten below)
    pair = torch.nn.Module()
    pair.col = ColumnParallelLinear(hidden, out, config=cfg, init_method=init, bias=True, gather_output=False)
    pair.row = RowParallelLinear(out, hidden, config=cfg, init_method=init, bias=True, input_is_parallel=True,
                                 skip_bias_add=False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # O(1) outputs, so the absolute errors read as relative ones
        for lin in (pair.col, pair.row):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen, dtype=f64) / math.sqrt(lin.weight.shape[1]))
            lin.bias.copy_(0.1 * torch.randn(lin.bias.shape, generator=gen, dtype=f64))
    entry["weight_device"] = str(pair.col.weight.device)
    adapter = get_adapter_model(pair, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["col", "row"],
                                                 init_lora_weights=False))
    tol = 1e-10 if dtype == f64 else 1e-4
    for name, layer in adapter.adapter_layers():
        g = layer.geometry
        x64 = torch.randn(seq, batch, g.in_features, generator=gen, dtype=f64)
        dy64 = torch.randn(seq, batch, g.out_features, generator=gen, dtype=f64)
        w, b = layer.weight.detach().cpu().double(), layer.bias.detach().cpu().double()
        a, bb = (getattr(layer, f)["default"].weight.detach().cpu().double().requires_grad_()
                 for f in ("lora_A", "lora_B"))
        xr = x64.clone().requires_grad_()
        yr = xr @ w.T + b + layer.scaling["default"] * ((xr @ a.T) @ bb.T)
        yr.backward(dy64)
        x = x64.to(dev, dtype).requires_grad_()
        y, extra_bias = layer(x)
        y.backward(dy64.to(dev, dtype))
        adapter.finalize_grads()  # TP=1: must leave the gradients as they are
        errs = {"output": max_err(y, yr), "input_grad": max_err(x.grad, xr.grad),
                "lora_A_grad": max_err(layer.lora_A["default"].weight.grad, a.grad),
                "lora_B_grad": max_err(layer.lora_B["default"].weight.grad, bb.grad)}
        with torch.no_grad(), adapter.disable_adapter():  # our F.linear base path vs megatron's own forward
            errs["base_vs_megatron_forward"] = max_err(layer(x)[0], layer.base_layer(x)[0])
        entry[name] = {"mode": g.parallel_mode, "in": g.in_features, "out": g.out_features, "r": r,
                       "max_abs_err": errs, "returned_bias_is_none": extra_bias is None}
        for what, err in errs.items():
            rep.check(entry, f"{name}.{what}", err, tol)


def hf_reference_logits(adapter: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of an independent Llama: see CPU_REF_NOTE."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from parallel_adapters.hf.config import LlamaShape
    from parallel_adapters.hf.mapping import megatron_to_hf_state_dict
    from parallel_adapters.mcore.hf_bridge import hf_config_from_model

    full = {n: p.detach().cpu().double() for n, p in adapter.model.named_parameters() if ".lora_" not in n}
    for _, layer in adapter.adapter_layers():  # TP=1, PP=1: local names are the global ones
        a, b = (getattr(layer, f)["default"].weight.detach().cpu().double() for f in ("lora_A", "lora_B"))
        full[f"{layer.module_name}.weight"] += layer.scaling["default"] * (b @ a)
    cfg = hf_config_from_model(adapter.model)
    config = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "dtype")})
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).double().eval()
    model.load_state_dict(megatron_to_hf_state_dict(full, LlamaShape.from_config(cfg)), strict=True)
    with torch.no_grad():
        return model(input_ids=input_ids.cpu(), use_cache=False).logits


def check_gpt(rep: Report, entry: dict) -> None:
    """1b. disable / merge / unmerge / merge_and_unload, a CPU reference, and 10 AdamW steps."""
    from parallel_adapters import LoraConfig, get_adapter_model
    from parallel_adapters.adapters.hosts.base import AdapterHost
    from parallel_adapters.mcore.gpt import GPTSettings, build_gpt, gpt_logits

    vocab = 100
    settings = GPTSettings(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                           num_query_groups=2, vocab_size=vocab, max_position_embeddings=64)
    reseed()
    base = build_gpt(settings)
    tokens = torch.randint(0, vocab, (2, 17), generator=torch.Generator().manual_seed(7)).to(device())
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def logits(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return gpt_logits(model, inputs).detach().clone()

    base_logits = logits(base)
    adapter = get_adapter_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    layers = adapter.adapter_layers()
    entry.update(settings=str(settings), logits_device=str(base_logits.device), cpu_reference=CPU_REF_NOTE)
    rep.check(entry, "adapted_layers", len(layers), 2 * len(TARGETS), "==")
    adapted = logits(adapter.model)
    rep.check(entry, "adapter_changes_logits", max_err(adapted, base_logits), 1e-3, ">=")  # non-vacuous
    with adapter.disable_adapter():
        rep.check(entry, "disable_adapter_vs_base", max_err(logits(adapter.model), base_logits), 1e-5)
    originals = {n: layer.weight.detach().clone() for n, layer in layers}
    adapter.merge_adapter()
    rep.check(entry, "merged_vs_adapted", max_err(logits(adapter.model), adapted), 1e-4)
    adapter.unmerge_adapter()
    restored = all(torch.equal(layer.weight, originals[n]) for n, layer in layers)
    rep.check(entry, "unmerge_restores_bitwise", float(restored), 1.0, "==")
    params = [p for p in adapter.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(10):
        optimizer.zero_grad()
        loss = F.cross_entropy(gpt_logits(adapter.model, inputs).float().flatten(0, 1), labels.flatten())
        loss.backward()
        adapter.finalize_grads()
        optimizer.step()
        losses.append(loss.item())
    entry.update(losses=losses, trainable_params=sum(p.numel() for p in params))
    rep.check(entry, "adamw_loss_drop", losses[0] - losses[-1], 1e-3, ">=")
    trained = logits(adapter.model)
    try:  # the trained factors (B far from 0) through an independent Llama on the CPU
        reference = hf_reference_logits(adapter, inputs)
        rep.check(entry, "trained_vs_transformers_cpu_float64", max_err(trained, reference), 1e-4)
    except Exception:  # noqa: BLE001  - a failed reference must not hide the merge checks below
        entry["transformers_reference_error"], rep.failed = traceback.format_exc(), True
        log(f"  transformers reference CRASHED:\n{entry['transformers_reference_error']}")
    plain = adapter.merge_and_unload()
    rep.check(entry, "merge_and_unload_vs_trained", max_err(logits(plain), trained), 1e-4)
    rep.check(entry, "no_wrappers_left", float(any(isinstance(m, AdapterHost) for m in plain.modules())), 0.0, "==")


def softmax_in_fp32(model: torch.nn.Module) -> bool:
    """Whether megatron's attention softmax upcasts bf16 scores to fp32 (gpt_transformer_config
    sets bf16=True from params_dtype; HF eager runs its softmax in fp32 too)."""
    from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax

    mods = [m for m in model.modules() if isinstance(m, FusedScaleMaskSoftmax)]
    return bool(mods) and all(m.input_in_float16 and m.softmax_in_fp32 for m in mods)


def build_mcore(shape: dict, lora: bool, fp32_factors: bool = True) -> tuple[torch.nn.Module, Any, dict]:
    from parallel_adapters import LoraConfig, get_adapter_model
    from parallel_adapters.mcore.gpt import GPTSettings, build_gpt

    reseed()
    model = build_gpt(GPTSettings(num_layers=1, hidden_size=shape["hidden"], ffn_hidden_size=shape["ffn"],
                                  num_attention_heads=shape["heads"], num_query_groups=shape["groups"],
                                  vocab_size=shape["vocab"], max_position_embeddings=shape["seq"],
                                  params_dtype=torch.bfloat16))
    info = {"params_dtype": "bfloat16 via GPTSettings.params_dtype", "softmax_in_fp32": softmax_in_fp32(model)}
    adapter = None
    if lora:
        adapter = get_adapter_model(model, LoraConfig(r=shape["r"], lora_alpha=2 * shape["r"], target_modules=TARGETS),
                                    autocast_adapter_dtype=fp32_factors)
        model = adapter.model
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_" in n)
    model.embedding.word_embeddings.weight.requires_grad_(True)  # so backward runs through the layer
    info["factor_dtype"] = next((str(p.dtype) for n, p in model.named_parameters() if ".lora_" in n), None)
    return model, adapter, info


def build_hf(shape: dict, peft: str | None, attn: str) -> tuple[torch.nn.Module, None, dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=shape["hidden"], intermediate_size=shape["ffn"], num_hidden_layers=1,
                         num_attention_heads=shape["heads"], num_key_value_heads=shape["groups"],
                         vocab_size=shape["vocab"], max_position_embeddings=shape["seq"], rms_norm_eps=1e-5,
                         tie_word_embeddings=False, use_cache=False)
    config._attn_implementation = attn
    with device():  # initialise on the GPU: a CPU init of 218M parameters costs seconds
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    for p in model.parameters():
        p.requires_grad_(False)
    if peft is not None:
        from peft import LoraConfig as PeftLoraConfig, get_peft_model

        model = get_peft_model(model, PeftLoraConfig(r=shape["r"], lora_alpha=2 * shape["r"], lora_dropout=0.0,
                                                     target_modules=HF_TARGETS),
                               autocast_adapter_dtype=(peft == "fp32"))  # PEFT's default: fp32 factors
    model.get_input_embeddings().weight.requires_grad_(True)
    factor = next((str(p.dtype) for n, p in model.named_parameters() if "lora_A" in n), None)
    return model, None, {"attn_implementation": attn, "factor_dtype": factor}


def time_variants(models: dict, losses: dict, warmup: int, repeats: int, budget_s: float) -> dict:
    """Round-robin rounds (start variant rotating); per step CUDA events around fwd+bwd and the
    peak memory (reset before each step).  Returns per variant [(ms, peak, resident, loss)]."""
    cuda = torch.cuda.is_available()
    names, rec, truncated = list(models), {n: [] for n in models}, False
    gc.collect()
    gc.disable()  # no collector pauses inside timed steps
    try:
        for rnd in range(warmup + repeats):
            if rnd >= warmup + 3 and time.monotonic() - _T0 > budget_s:
                truncated = True  # device time is scarce: stop here, keep what was measured
                break
            k = rnd % len(names)
            for name in names[k:] + names[:k]:
                for p in models[name].parameters():
                    p.grad = None
                sync()
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                resident, t0 = torch.cuda.memory_allocated() if cuda else 0, time.perf_counter()
                loss = losses[name]()
                loss.backward()
                if cuda:
                    end.record()
                    end.synchronize()
                ms = start.elapsed_time(end) if cuda else 1e3 * (time.perf_counter() - t0)
                if rnd >= warmup:
                    rec[name].append((ms, torch.cuda.max_memory_allocated() if cuda else 0, resident, loss.item()))
    finally:
        gc.enable()
    return {"records": rec, "truncated": truncated}


def summarise(records: dict) -> dict:
    out = {}
    for name, recs in records.items():
        ms = [r[0] for r in recs]
        out[name] = {"median_ms": statistics.median(ms), "min_ms": min(ms), "step_ms": [round(t, 3) for t in ms],
                     "peak_mib": max(r[1] for r in recs) / 2**20, "resident_mib": recs[-1][2] / 2**20,
                     "step_peak_minus_resident_mib": max(r[1] - r[2] for r in recs) / 2**20, "first_loss": recs[0][3]}
    for name, res in out.items():
        frozen = out.get("mcore_frozen" if name.startswith("mcore") else "hf_frozen")
        if frozen is not None and frozen is not res:  # paired = within the same round
            res.update(vs_frozen_paired=statistics.median(a / b for a, b in zip(res["step_ms"], frozen["step_ms"])),
                       vs_frozen_of_medians=res["median_ms"] / frozen["median_ms"],
                       extra_ms=res["median_ms"] - frozen["median_ms"])
    return out


def timing(rep: Report, entry: dict, shape: dict, args: argparse.Namespace) -> None:
    """2. One 8B-shaped layer in bf16, each stack against its own frozen base."""
    from parallel_adapters.mcore.gpt import gpt_logits

    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"] + 1), generator=gen).to(device())
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    entry.update(shape=shape, dtype="bfloat16", warmup=args.warmup, repeats=args.repeats, notes=TIMING_NOTES)

    def loss_fn(m: torch.nn.Module, hf: bool) -> Callable[[], torch.Tensor]:
        run = (lambda: m(input_ids=inputs, use_cache=False).logits) if hf else (lambda: gpt_logits(m, inputs))
        return lambda: F.cross_entropy(run().float().flatten(0, 1), labels.flatten())

    builders = {"mcore_frozen": lambda: build_mcore(shape, False), "mcore_ours_lora": lambda: build_mcore(shape, True),
                "mcore_ours_lora_bf16_factors": lambda: build_mcore(shape, True, fp32_factors=False),
                "hf_frozen": lambda: build_hf(shape, None, args.hf_attn),
                "hf_peft_lora": lambda: build_hf(shape, "fp32", args.hf_attn),
                "hf_peft_lora_bf16_factors": lambda: build_hf(shape, "bf16", args.hf_attn)}
    models, losses, adapters, info, errors = {}, {}, {}, {}, {}
    for name, build in builders.items():
        try:
            t0 = time.monotonic()
            models[name], adapters[name], meta = build()
            sync()
            losses[name] = loss_fn(models[name], name.startswith("hf"))
            losses[name]().backward()  # one untimed step: a variant that cannot run is dropped here
            info[name] = dict(meta, build_s=round(time.monotonic() - t0, 2),
                              trainable_params=sum(p.numel() for p in models[name].parameters() if p.requires_grad))
            log(f"  built {name} in {info[name]['build_s']} s ({info[name]['trainable_params']:,} trainable)")
        except Exception:  # noqa: BLE001  - the other variants still run
            errors[name] = traceback.format_exc()
            log(f"  {name} failed to build or run:\n{errors[name]}")
            for table in (models, losses, adapters):
                table.pop(name, None)
    entry.update(variants=info, build_errors=errors)
    if not models:
        raise RuntimeError("no timing variant could be built")
    out = time_variants(models, losses, args.warmup, args.repeats, args.budget_s)
    results = entry["results"] = summarise(out["records"])
    entry["truncated_by_budget"] = out["truncated"]
    if "mcore_frozen" in results and "mcore_ours_lora" in results:  # B = 0 at init: the base's loss
        diff = abs(results["mcore_ours_lora"]["first_loss"] - results["mcore_frozen"]["first_loss"])
        rep.check(entry, "ours_b0_loss_equals_frozen_bf16", diff, 2e-2)
    if adapters.get("mcore_ours_lora") is not None:
        losses["mcore_ours_lora"]().backward()
        sync()
        t0 = time.perf_counter()
        adapters["mcore_ours_lora"].finalize_grads()
        sync()
        entry["finalize_grads_ms"] = 1e3 * (time.perf_counter() - t0)
        log(f"  finalize_grads: {entry['finalize_grads_ms']:.3f} ms (TP=1: nothing to sum)")


def metadata(args: argparse.Namespace) -> dict:
    from importlib.metadata import version

    versions = {}
    for pkg in ("torch", "megatron-core", "peft", "transformers", "safetensors"):
        with contextlib.suppress(Exception):  # a missing package stays missing in the JSON
            versions[pkg] = version(pkg)
    gpu: dict = {"gpu": None}
    with contextlib.suppress(Exception):  # a broken driver must not cost the JSON
        if torch.cuda.is_available():
            gpu = {"gpu": torch.cuda.get_device_name(0), "gpu_capability": list(torch.cuda.get_device_capability(0)),
                   "cudnn": torch.backends.cudnn.version()}
    return {
        "benchmark": "bench_gpu: adapters on CUDA through megatron's GPU path (correctness + bf16 layer timing)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python3", os.path.relpath(os.path.abspath(sys.argv[0]), REPO_ROOT)] + sys.argv[1:]),
        "versions": versions, "python": platform.python_version(), "platform": platform.platform(),
        "cuda_version": torch.version.cuda, **gpu, "smoke": args.smoke, "tp_note": TP_NOTE,
    }


def markdown(data: dict) -> str:
    """One row per section (every check is in the log and the JSON), then the timing table."""
    rows = ["| section | status | checks passed | failed / error |", "|---|---|---|---|"]
    for sec, e in data["sections"].items():
        failed = [n for n, c in e["checks"].items() if not c["pass"]]
        why = e["traceback"].strip().splitlines()[-1][:100] if e["status"] == "error" else ", ".join(failed)
        rows.append(f"| {sec} | {e['status']} | {len(e['checks']) - len(failed)}/{len(e['checks'])} | {why} |")
    tim = data["sections"].get("timing_bf16", {})
    if not tim.get("results"):
        return "\n".join(rows)
    rows += ["", f"one layer {tim.get('shape')}, bf16, fwd+bwd, median of timed steps", "",
             "| variant | median ms | vs frozen (paired) | extra ms | peak MiB | step peak-resident MiB | trainable |",
             "|---|---|---|---|---|---|---|"]
    for name, r in tim.get("results", {}).items():
        ratio, extra = f"{r.get('vs_frozen_paired', 1.0):.3f}", f"{r.get('extra_ms', 0.0):+.2f}"
        rows.append(f"| {name} | {r['median_ms']:.2f} | {ratio} | {extra} | {r['peak_mib']:.0f} | "
                    f"{r['step_peak_minus_resident_mib']:.0f} | {tim['variants'][name]['trainable_params']:,} |")
    for name, err in tim.get("build_errors", {}).items():
        rows.append(f"| {name} | build failed: {err.strip().splitlines()[-1][:80]} |")
    return "\n".join(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON path (rewritten after every section)")
    parser.add_argument("--smoke", action="store_true", help="tiny timing shapes (also the CPU-only test)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--hf-attn", default="eager", help="transformers attention: eager (like megatron's local "
                        "unfused attention, softmax in fp32) or sdpa")
    parser.add_argument("--budget-s", type=float, default=180.0,
                        help="stop the timed rounds (after 3) once the whole run has taken this long")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    rep = Report(args.out, metadata(args))
    rep.save()  # metadata lands even if a hung collective gets the process killed
    log(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU {rep.data['metadata']['gpu']}")
    with rep.section("setup") as entry:
        setup(rep, entry)
    if rep.data["sections"]["setup"]["status"] == "ok":
        with rep.section("layers_float64") as entry:
            check_layers(rep, entry, torch.float64)
        with rep.section("layers_float32") as entry:
            check_layers(rep, entry, torch.float32)
        with rep.section("gpt_float32") as entry:
            check_gpt(rep, entry)
        with rep.section("timing_bf16", correctness=False) as entry:
            timing(rep, entry, SMOKE if args.smoke else FULL, args)
    rep.data["metadata"]["runtime_s"] = round(time.monotonic() - _T0, 1)
    rep.data["markdown"] = table = markdown(rep.data)
    rep.save()
    print(table, flush=True)
    code = 1 if rep.failed else (2 if rep.timing_crashed else 0)
    log(f"wrote {args.out}; exit {code} ({len(rep.data['checks_failed'])} failed checks)")
    with contextlib.suppress(Exception):
        torch.distributed.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
