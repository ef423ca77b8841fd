#!/usr/bin/env python
"""Prepared GPU check: the adapters on CUDA through megatron's own GPU path (one GPU, NCCL world 1).

    python3 benchmarks/bench_gpu.py --out gpu.json                     # GPU box (scripts/gpu_check.sh)
    python benchmarks/bench_gpu.py --smoke --out /tmp/gpu_smoke.json   # tiny timing shapes, any box

Sections (setup, layers_float64/32, gpt_float32, moe, timing_bf16: see each function's docstring) catch
their own exceptions (traceback into the JSON); the JSON is rewritten after each, so a killed run
still leaves what it measured.  Without CUDA (smoke only) megatron needs mcore/cpu.py and gloo.
moe's two CUDA-only parts (the alltoall dispatcher; GroupedMLP with the grouped_gemm package) say
"skipped: <why>" in the JSON where they cannot run (on the CPU: both) and that is no failure; a part
that crashes is a failed check (`<part>.crashed`), its traceback in its entry.
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


MOE_ALLTOALL_SKIP = ("skipped: no CUDA (megatron's alltoall dispatcher creates CUDA streams; build_gpt refuses it "
                     "on the CPU, mcore/moe.py check_moe_layout)")
MOE_BF16_NOTE = ("GroupedMLP needs bf16 (grouped_gemm's kernel): both models bf16, one layer (the router sees the "
                 "same bf16 input in both, so routing is the same); errors relative to the largest |value| of the "
                 "SequentialMLP run (per gradient tensor). Tolerances 5e-2 / 1e-1: 4-6x what the CPU gives with a torch "
                 "stand-in for gmm (1.3e-2 / 1.7e-2); the experts' adapters swapped give 1.0 / 19")


def moe_settings(dtype: torch.dtype, dispatcher: str = "allgather", num_layers: int = 2, grouped: bool = False) -> Any:
    """The tiny MoE GPT: 4 experts (ffn 32), top-2, GQA, EP 1 (world size 1)."""
    from parallel_adapters.mcore.gpt import GPTSettings

    return GPTSettings(num_layers=num_layers, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                       num_query_groups=2, vocab_size=100, max_position_embeddings=64, num_moe_experts=4,
                       moe_router_topk=2, moe_ffn_hidden_size=32, moe_token_dispatcher_type=dispatcher,
                       moe_grouped_gemm=grouped, params_dtype=dtype)


def adapter_grads(adapter: Any) -> dict[str, torch.Tensor]:
    """Every adapter tensor's gradient under its global name, one entry per expert (a GroupedMLP
    host stacks its experts' factors: split by `expert_names`), so both expert kinds compare by name."""
    out = {}
    for _, host in adapter.adapter_layers():
        tensors, experts = host.adapter_tensors("default"), getattr(host, "expert_names", None)
        for decl in host.tensor_decls("default"):
            grad = tensors[decl.name].grad
            if grad is None:
                raise RuntimeError(f"{host.module_name}.{decl.name}: no gradient after backward")
            if isinstance(experts, tuple):
                out.update({f"{e}.{decl.name}": grad[i] for i, e in enumerate(experts)})
            else:
                out[f"{host.module_name}.{decl.name}"] = grad
    return out


def moe_lora_step(base: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[Any, dict]:
    """Expert + attention LoRA (non-zero B), one forward and backward: (adapter, logits and adapter grads)."""
    from parallel_adapters import LoraConfig, get_adapter_model
    from parallel_adapters.mcore.gpt import gpt_logits

    adapter = get_adapter_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    logits = gpt_logits(adapter.model, inputs)
    F.cross_entropy(logits.float().flatten(0, 1), labels.flatten()).backward()
    return adapter, {"logits": logits.detach().float(), "grads": adapter_grads(adapter)}


def copy_sequential_to_grouped(grouped: torch.nn.Module, sequential: torch.nn.Module) -> float:
    """Every parameter by name, and each GroupedMLP's weight1 / weight2 from its SequentialMLP experts
    (weight1 viewed [E, H, F1] holds fc1's W_e^T, weight2 viewed [E, F2, H] fc2's).  Returns the
    largest change made: 0 when build_gpt's init already gave both the same weights."""
    seq, change = dict(sequential.named_parameters()), 0.0
    with torch.no_grad():
        pairs = [(p, seq[n]) for n, p in grouped.named_parameters() if n in seq]
        for g_layer, s_layer in zip(grouped.decoder.layers, sequential.decoder.layers):
            experts, hidden = s_layer.mlp.experts.local_experts, g_layer.config.hidden_size
            w1 = g_layer.mlp.experts.weight1.view(len(experts), hidden, -1)
            w2 = g_layer.mlp.experts.weight2.view(len(experts), -1, hidden)
            for e, expert in enumerate(experts):
                pairs += [(w1[e], expert.linear_fc1.weight.t()), (w2[e], expert.linear_fc2.weight.t())]
        for dst, src in pairs:
            change = max(change, max_err(dst, src))
            dst.copy_(src)
    return change


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return max_err(a, ref) / max(float(ref.detach().abs().max()), 1e-30)


def check_alltoall(rep: Report, entry: dict, inputs: torch.Tensor, labels: torch.Tensor, ref: dict) -> None:
    """(a) megatron's alltoall dispatcher (CUDA only) gives the allgather run's logits and adapter grads."""
    from parallel_adapters.mcore.gpt import build_gpt

    reseed()
    adapter, out = moe_lora_step(build_gpt(moe_settings(torch.float32, "alltoall")), inputs, labels)
    dispatcher = type(adapter.model.decoder.layers[0].mlp.token_dispatcher).__name__
    entry["alltoall_vs_allgather"] = {"dispatcher": dispatcher}
    rep.check(entry, "alltoall.dispatcher_built", float(dispatcher == "MoEAlltoAllTokenDispatcher"), 1.0, "==")
    rep.check(entry, "alltoall.grad_names_match", float(out["grads"].keys() == ref["grads"].keys()), 1.0, "==")
    rep.check(entry, "alltoall_vs_allgather.logits", max_err(out["logits"], ref["logits"]), 1e-5)
    rep.check(entry, "alltoall_vs_allgather.adapter_grads",
              max(max_err(g, ref["grads"][n]) for n, g in out["grads"].items()), 1e-5)


def check_grouped(rep: Report, entry: dict, inputs: torch.Tensor, labels: torch.Tensor) -> None:
    """(b) GroupedMLP experts (the real grouped_gemm) with LoRA vs SequentialMLP with the same
    weights and adapters, bf16 (see MOE_BF16_NOTE)."""
    import dataclasses

    from parallel_adapters.mcore.gpt import build_gpt

    sub = entry["grouped_vs_sequential_bf16"] = {"note": MOE_BF16_NOTE}
    settings = moe_settings(torch.bfloat16, num_layers=1)
    reseed()
    sequential = build_gpt(settings)
    reseed()
    grouped = build_gpt(dataclasses.replace(settings, moe_grouped_gemm=True))
    sub["experts"] = type(grouped.decoder.layers[0].mlp.experts).__name__
    rep.check(entry, "grouped.experts_are_grouped_mlp", float(sub["experts"] == "GroupedMLP"), 1.0, "==")
    rep.check(entry, "grouped.init_equals_sequential", copy_sequential_to_grouped(grouped, sequential), 0.0, "==")
    seq, seq_out = moe_lora_step(sequential, inputs, labels)
    grp, grp_out = moe_lora_step(grouped, inputs, labels)
    sub["host"] = type(grp.model.decoder.layers[0].mlp.experts).__name__
    seq_state, grp_state = seq.adapter_state_dict(), grp.adapter_state_dict()
    same = seq_state.keys() == grp_state.keys() and all(torch.equal(grp_state[n].local, t.local)
                                                          for n, t in seq_state.items())
    rep.check(entry, "grouped.adapter_init_equals_sequential", float(same), 1.0, "==")
    rep.check(entry, "grouped.grad_names_match", float(grp_out["grads"].keys() == seq_out["grads"].keys()), 1.0, "==")
    rep.check(entry, "grouped_vs_sequential_bf16.logits_rel", rel_err(grp_out["logits"], seq_out["logits"]), 5e-2)
    rep.check(entry, "grouped_vs_sequential_bf16.adapter_grads_rel",
              max(rel_err(g, seq_out["grads"][n]) for n, g in grp_out["grads"].items()), 1e-1)


def check_moe(rep: Report, entry: dict) -> None:
    """1c. A MoE GPT (4 experts, top-2, EP 1) with LoRA on attention and every expert, float32,
    allgather dispatcher: the expert adapters are built, change the logits, get gradients and merge.
    Then (a) the alltoall dispatcher against it (CUDA only) and (b) GroupedMLP against SequentialMLP
    (grouped_gemm and CUDA only); each records why it was skipped, and a crash in one is recorded
    (traceback in its entry, a correctness failure) without hiding the other."""
    from parallel_adapters.adapters.grouped_experts import grouped_gemm_unavailable_reason
    from parallel_adapters.mcore.gpt import build_gpt, gpt_logits

    tokens = torch.randint(0, 100, (2, 17), generator=torch.Generator().manual_seed(11)).to(device())
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    reseed()
    adapter, ref = moe_lora_step(build_gpt(moe_settings(torch.float32)), inputs, labels)
    entry.update(settings=str(moe_settings(torch.float32)), logits_device=str(ref["logits"].device))
    experts = [n for n, _ in adapter.adapter_layers() if ".local_experts." in n]
    rep.check(entry, "expert_lora_layers", len(experts), 2 * 4 * 2, "==")  # layers x experts x (fc1, fc2)
    with torch.no_grad(), adapter.disable_adapter():
        base = gpt_logits(adapter.model, inputs)
    rep.check(entry, "adapter_changes_logits", max_err(ref["logits"], base), 1e-3, ">=")  # non-vacuous
    grads = [float(g.abs().max()) for n, g in ref["grads"].items() if ".local_experts." in n]
    rep.check(entry, "expert_lora_grads_nonzero", min(grads), 1e-8, ">=")  # top-2 of 4 over 32 tokens: all hit
    adapter.merge_adapter()
    with torch.no_grad():
        rep.check(entry, "merged_vs_adapted", max_err(gpt_logits(adapter.model, inputs), ref["logits"]), 1e-4)
    parts = {"alltoall_vs_allgather": (None if torch.cuda.is_available() else MOE_ALLTOALL_SKIP,
                                       lambda: check_alltoall(rep, entry, inputs, labels, ref)),
             "grouped_vs_sequential_bf16": (grouped_gemm_unavailable_reason(),
                                            lambda: check_grouped(rep, entry, inputs, labels))}
    for name, (skip, run) in parts.items():
        if skip is not None:
            entry[name] = {"skipped": skip if skip.startswith("skipped") else f"skipped: {skip}"}
            log(f"  {name}: {entry[name]['skipped']}")
            continue
        try:
            run()
        except Exception:  # noqa: BLE001  - one never-run CUDA path must not hide the other
            entry.setdefault(name, {})["traceback"] = traceback.format_exc()
            log(f"  {name} CRASHED:\n{entry[name]['traceback']}")
            rep.check(entry, f"{name}.crashed", 1.0, 0.0, "==")  # a failed check: in the table and the exit code


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
        with rep.section("moe") as entry:
            check_moe(rep, entry)
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
