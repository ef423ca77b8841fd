#!/usr/bin/env python
"""EVA benchmark (docs/design.md section 9): ours vs PEFT 0.21.2's EVA with gather_distributed_inputs=True.

Model: a Hugging Face style stack (token embedding, then 4 nn.Linear(512, 512) in sequence, each
changing the decay of the signal's spectrum, so the layers get different ranks), the same for both (PEFT needs plain nn.Linear; ours wraps them as ReplicatedLoRA under data
parallelism).  Data: every rank gets its own 2048 tokens per batch (8 x 256, ~5% padding); the
embedding table is low rank with decaying singular values (+ noise), so every layer input has a
well defined spectrum.  LoRA r=8, rho=2, tau=0.99 on all 4 linears.

Run on 2 and on 4 gloo CPU ranks (tests/harness WorkerPool: 1 thread per rank, collective
counters installed before anything else is imported); a fresh pool per method, so peak memory
is not shared between them.  Per method and world size:

- bytes communicated per EVA step and per rank, counted exactly (tests/harness/counting: the
  payload each rank passes to every collective; all-gathers count the rank's own contribution);
- peak RSS per rank during EVA (high-water mark reset just before it; resource.getrusage);
- wall time of the EVA call (slowest rank; 2 shared cores, so only ratios mean much);
- agreement: subspace similarity of each layer's components at its assigned rank with an exact
  float64 SVD of that layer's input over ALL the data of all ranks.

Also records the loss curves of LoRA training from EVA and from the default init
(tests/unit/eva/test_initialize_single.py).

The real-model-shape case (`--cases llama`): a 135M Llama (SmolLM-135M's shape: 30 layers,
hidden 576, ffn 1536, 9 heads, 3 KV groups, vocab 49152, tied embeddings), randomly initialised
by transformers from a config (seed 0, no download) and saved once to a temporary directory;
PEFT's EVA runs on that LlamaForCausalLM, ours on the Megatron GPT imported from the same file
(mcore.hf_bridge), so both see the same weights and the same batches of 2 x 126 tokens.  r=16
(cap 32) on q/k/v/o/gate/up/down (PEFT) = linear_qkv/linear_proj/linear_fc1/linear_fc2 (ours):
120 decompositions per step either way.  Ours at world size 1 and at TP=3 (3 gloo ranks), PEFT's
at world size 1, one fresh pool per run, `--llama-rounds` interleaved rounds.  A random model
does not converge in a useful time (21 of 120 layers after 60 steps), so every run stops after
`--llama-steps` EVA steps; "per step" is the median over steps 2.. (the first has the set-up:
ours probes the layers, PEFT runs an extra hashing forward before its first step).  Ratios are
taken within one round.  `--profile` adds a cProfile run of each (not timed).

    python benchmarks/bench_eva.py --out benchmarks/results/eva.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

HIDDEN, LAYERS, VOCAB = 512, 4, 4096
BATCH, SEQ = 8, 256  # 2048 tokens per rank per batch
R, RHO, TAU = 8, 2.0, 0.99
GAMMAS = (0.8, 1.15, 0.85, 1.0)  # per-layer change of the spectrum's decay (see build_model)
METHODS = ("peft", "ours")


# ------------------------------------------------------------------------------------------------
# Model and data (built identically in every process)
# ------------------------------------------------------------------------------------------------

def build_model():
    import torch
    from torch import nn

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.embed = nn.Embedding(VOCAB, HIDDEN)
            rank = 48
            u = torch.linalg.qr(torch.randn(VOCAB, rank, generator=g)).Q
            v = torch.linalg.qr(torch.randn(HIDDEN, rank, generator=g)).Q
            s = 40.0 * torch.tensor([0.85 ** j for j in range(rank)])
            table = u @ torch.diag(s) @ v.T + 2e-3 * torch.randn(VOCAB, HIDDEN, generator=g)
            self.embed.weight.data.copy_(table)
            self.layers = nn.ModuleList([nn.Linear(HIDDEN, HIDDEN) for _ in range(LAYERS)])
            basis = v  # where the signal lives in the current layer's input
            for layer, gamma in zip(self.layers, GAMMAS):
                # damp (gamma < 1) or flatten (gamma > 1) the signal's spectrum, then rotate: each
                # layer input gets its own spectrum, so the rank allocation has work to do
                scale = torch.tensor([gamma ** j for j in range(rank)])
                q = torch.linalg.qr(torch.randn(HIDDEN, HIDDEN, generator=g)).Q
                w = q @ (torch.eye(HIDDEN) + basis @ torch.diag(scale - 1) @ basis.T)
                layer.weight.data.copy_(w)
                layer.bias.data.zero_()
                basis = q @ basis

        def forward(self, input_ids, attention_mask=None, labels=None):
            h = self.embed(input_ids)
            for layer in self.layers:
                h = layer(h)
            return h

    return Stack()


def make_batches(world: int, n_batches: int, seed: int = 1) -> list[list[dict]]:
    """n_batches per rank, each rank its own tokens."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(world):
        mine = []
        for _ in range(n_batches):
            mask = (torch.rand(BATCH, SEQ, generator=g) > 0.05).long()
            mine.append({"input_ids": torch.randint(0, VOCAB, (BATCH, SEQ), generator=g), "attention_mask": mask})
        out.append(mine)
    return out


TARGETS = [f"layers.{i}" for i in range(LAYERS)]


# ------------------------------------------------------------------------------------------------
# Worker side
# ------------------------------------------------------------------------------------------------

def _quiet() -> None:
    import warnings

    warnings.filterwarnings("ignore")


def _rss_kb() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as fh:  # resets the RSS high-water mark (Linux)
            fh.write("5")
    except OSError:
        pass


def eva_job(method: str, per_rank: list[list[dict]]) -> dict:
    """One method's EVA on this rank's batches; components, counters, time and memory."""
    _quiet()
    import resource

    import peft
    import torch
    import torch.distributed as dist

    from parallel_adapters import EvaConfig, LoraConfig, ParallelGroups, get_adapter_model
    from parallel_adapters.eva.initialize import get_eva_layer_states
    from tests.harness import counting

    rank, world = dist.get_rank(), dist.get_world_size()
    batches = per_rank[rank]
    model = build_model()
    steps = []

    def forward(m, batch):
        steps.append(1)
        return m(**{k: v for k, v in batch.items() if k != "labels"})

    if method == "ours":
        groups = ParallelGroups(dp_group=dist.group.WORLD, dp_size=world, dp_rank=rank)
        config = LoraConfig(r=R, lora_alpha=R, target_modules=TARGETS, init_lora_weights="eva",
                            eva_config=EvaConfig(rho=RHO, tau=TAU))
        adapted = get_adapter_model(model, config, groups=groups)
    else:
        config = peft.LoraConfig(r=R, lora_alpha=R, target_modules=TARGETS, init_lora_weights="eva",
                                 eva_config=peft.EvaConfig(rho=RHO, tau=TAU))
        adapted = peft.get_peft_model(model, config)
    dist.barrier()
    baseline = _rss_kb()
    _reset_peak()
    t0 = time.perf_counter()
    with counting.counted() as c:
        if method == "ours":
            state = get_eva_layer_states(adapted, batches, forward_fn=forward, show_progress_bar=False)
            comps = {n: s.components.double() for n, s in state.items()}
        else:
            state = peft.get_eva_state_dict(adapted, batches, forward_fn=forward, gather_distributed_inputs=True,
                                            show_progress_bar=False)
            comps = {n.replace("base_model.model.", ""): t.double() for n, t in state.items()}
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"components": comps, "steps": len(steps), "calls": dict(c.calls), "bytes": dict(c.bytes),
            "wall_s": wall, "peak_rss_kb": peak, "baseline_rss_kb": baseline}


# ------------------------------------------------------------------------------------------------
# Driver side
# ------------------------------------------------------------------------------------------------

def exact_components(per_rank: list[list[dict]]) -> dict:
    """Top components of every layer's input over all (unmasked) tokens of all ranks, float64 SVD."""
    import torch

    model = build_model().double()
    inputs: dict[str, list] = {name: [] for name in TARGETS}
    keep: dict[str, torch.Tensor] = {}

    def capture(name):
        return lambda mod, args: inputs[name].append(args[0][keep["mask"]])

    hooks = [model.get_submodule(n).register_forward_pre_hook(capture(n)) for n in TARGETS]
    with torch.no_grad():
        for batches in per_rank:
            for b in batches:
                keep["mask"] = b["attention_mask"].bool()
                model(b["input_ids"])
    for h in hooks:
        h.remove()
    out = {}
    for n, rows in inputs.items():
        x = torch.cat(rows)
        _, _, vt = torch.linalg.svd(x - x.mean(0), full_matrices=False)
        out[n] = vt[: round(R * RHO)]
    return out


def summarize(method: str, world: int, results: list[dict], exact: dict) -> dict:
    from parallel_adapters.eva.statistics import subspace_similarity

    r0 = results[0]
    ranks = {n: int(t.shape[0]) for n, t in r0["components"].items()}
    agreement = {n: subspace_similarity(t, exact[n][: t.shape[0]]) for n, t in r0["components"].items() if t.shape[0]}
    total = [sum(r["bytes"].values()) for r in results]
    received = [sum(b * (world if op.startswith("all_gather") else 1) for op, b in r["bytes"].items()) for r in results]
    steps = r0["steps"]
    return {
        "method": method, "world_size": world, "steps": steps, "ranks": ranks,
        "bytes_total_per_rank": max(total), "bytes_per_step_per_rank": max(total) / steps,
        "bytes_received_per_step_per_rank": max(received) / steps,
        "calls": r0["calls"], "bytes_by_op_rank0": r0["bytes"],
        "wall_s": max(r["wall_s"] for r in results),
        "peak_rss_mb_per_rank": [r["peak_rss_kb"] / 1024 for r in results],
        "peak_rss_over_baseline_mb_per_rank": [(r["peak_rss_kb"] - r["baseline_rss_kb"]) / 1024 for r in results],
        "agreement": agreement, "agreement_min": min(agreement.values()),
    }


def training_curves() -> dict:
    from tests.unit.eva.test_initialize_single import lora_training_curve

    return {"eva": lora_training_curve("eva"), "default": lora_training_curve("default"),
            "setup": "nn.Linear(32, 32) on a gap-spectrum embedding, LoRA r=4, MSE to base(x) + x dW^T, "
                     "AdamW lr 1e-2, 20 steps, same data and seed"}


def table(rows: list[dict], curves: dict) -> str:
    lines = ["| ranks | method | EVA steps | bytes/step/rank | bytes ratio (PEFT/ours) | peak RSS MB (max rank) "
             "| peak over baseline MB | wall s | agreement min | ranks equal to PEFT |", "|---|---|---|---|---|---|---|---|---|---|"]
    by = {(r["world_size"], r["method"]): r for r in rows}
    for (world, method), r in sorted(by.items()):
        peft_row = by.get((world, "peft"))
        ratio = peft_row["bytes_per_step_per_rank"] / r["bytes_per_step_per_rank"] if method == "ours" else 1.0
        same = "" if method == "peft" else str(r["ranks"] == peft_row["ranks"])
        lines.append(f"| {world} | {method} | {r['steps']} | {r['bytes_per_step_per_rank']:,.0f} | {ratio:.1f} | "
                     f"{max(r['peak_rss_mb_per_rank']):.0f} | {max(r['peak_rss_over_baseline_mb_per_rank']):.0f} | "
                     f"{r['wall_s']:.2f} | {r['agreement_min']:.5f} | {same} |")
    lines.append("")
    lines.append(f"LoRA training loss after {len(curves['eva'])} steps: EVA {curves['eva'][-1]:.4f}, "
                 f"default init {curves['default'][-1]:.4f} (start {curves['eva'][0]:.4f}).")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Real model shape: a 135M Llama, ours at world size 1 and TP=3 vs PEFT at world size 1
# ------------------------------------------------------------------------------------------------

LLAMA = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
             num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048)
LLAMA_BATCH, LLAMA_SEQ, LLAMA_R = 2, 126, 16
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MCORE_TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
PROFILED = ("StepQueue.flush", "process_step", "decide", "tp_svd", "power_step", "partial_fit", "hash_fn",
            "_get_rank_distribution", "_all_reduce", "all_reduce_coalesced_")


def save_llama(directory: str) -> str:
    """The random-init LlamaForCausalLM, written once (safetensors) for both methods to load."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    model.save_pretrained(directory)
    return directory


def llama_batches(n: int, seed: int = 7) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, LLAMA["vocab_size"], (LLAMA_BATCH, LLAMA_SEQ), generator=g),
             "attention_mask": torch.ones(LLAMA_BATCH, LLAMA_SEQ, dtype=torch.long)} for _ in range(n)]


class _Stop(Exception):
    """Ends PEFT's EVA loop (which has no step cap) after the timed steps."""


_STATS_S = [0.0]
"""Seconds spent so far in the EVA statistics (timed wrappers, see _time_statistics)."""


class _TimedLoader:
    """Yields the batches, noting when each is taken and the statistics time so far; raises _Stop
    when batch `stop` of an iteration is asked for (PEFT iterates once for its hashing pass, then
    again)."""

    def __init__(self, batches: list[dict], stop: int | None = None):
        self.batches, self.stop, self.times, self.stats = batches, stop, [], []

    def __len__(self) -> int:
        return len(self.batches)

    def mark(self) -> None:
        self.times.append(time.perf_counter())
        self.stats.append(_STATS_S[0])

    def __iter__(self):
        self.times, self.stats = [], []
        for i, batch in enumerate(self.batches):
            self.mark()
            if i == self.stop:
                raise _Stop
            yield batch


def _time_statistics(owner, name: str) -> None:
    """Wrap owner.name so that its wall time adds to _STATS_S."""
    inner = getattr(owner, name)

    def timed(*args, **kwargs):
        began = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            _STATS_S[0] += time.perf_counter() - began

    setattr(owner, name, timed)


def _plain_forward_s(forward, batches: list[dict]) -> float:
    import torch

    with torch.no_grad():
        forward(batches[0])
        began = time.perf_counter()
        for b in batches[1:3]:
            forward(b)
    return (time.perf_counter() - began) / 2


def llama_job(method: str, hf_dir: str, batches: list[dict], steps: int, profile: bool) -> dict:
    """One EVA run of `steps` steps on this rank; per-step times (and a cProfile summary)."""
    _quiet()
    import cProfile

    import peft
    import torch
    import torch.distributed as dist

    from parallel_adapters import EvaConfig, LoraConfig, get_adapter_model
    from parallel_adapters.eva.initialize import get_eva_layer_states

    eva = dict(rho=2.0, tau=0.99)
    if method == "peft":  # its statistics: the SVD hooks, inside the forward
        from peft.tuners.lora import eva as peft_eva

        _time_statistics(peft_eva.SVDHook, "__call__")
    else:  # ours: the step queue's decompositions (after the forward), the merges and the decisions
        from parallel_adapters.eva import distributed

        for owner, name in ((distributed.StepQueue, "flush"), (distributed, "process_step"), (distributed, "decide")):
            _time_statistics(owner, name)
    if method == "peft":
        import transformers

        model = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()
        plain = _plain_forward_s(lambda b: model(**b), batches)
        config = peft.LoraConfig(r=LLAMA_R, lora_alpha=LLAMA_R, target_modules=HF_TARGETS, init_lora_weights="eva",
                                 eva_config=peft.EvaConfig(**eva))
        adapted = peft.get_peft_model(model, config, low_cpu_mem_usage=True)
        loader = _TimedLoader(batches, stop=steps)
        run = lambda: peft.get_eva_state_dict(adapted, loader, show_progress_bar=False)  # noqa: E731
    else:
        from parallel_adapters.mcore import compat, cpu
        from parallel_adapters.mcore.gpt import build_gpt
        from parallel_adapters.mcore.hf_bridge import gpt_settings_from_hf, import_hf_checkpoint

        cpu.enable_cpu_mode()
        groups = compat.initialize_model_parallel(dist.get_world_size(), 1)
        cpu.model_parallel_seed(1234)  # the RNG tracker (no dropout runs in eval)
        model = build_gpt(gpt_settings_from_hf(hf_dir), init_weights=False)
        import_hf_checkpoint(model, hf_dir, groups)
        model.eval()
        plain = _plain_forward_s(lambda b: model(b["input_ids"], None, None), batches)
        config = LoraConfig(r=LLAMA_R, lora_alpha=LLAMA_R, target_modules=MCORE_TARGETS, init_lora_weights="eva",
                            eva_config=EvaConfig(**eva, max_steps=steps))
        adapted = get_adapter_model(model, config, groups=groups)
        loader = _TimedLoader(batches)
        run = lambda: get_eva_layer_states(adapted, loader, show_progress_bar=False)  # noqa: E731
    dist.barrier()
    prof = cProfile.Profile() if profile else None
    began = time.perf_counter()
    try:
        if prof is not None:
            prof.enable()
        run()
    except _Stop:
        pass
    finally:
        if prof is not None:
            prof.disable()
    ended = time.perf_counter()
    if method != "peft":
        loader.mark()  # ours returns after its last step; PEFT's end is the mark of the batch it asked for
    marks, stats = loader.times[: steps + 1], loader.stats[: steps + 1]
    out = {"step_s": [b - a for a, b in zip(marks, marks[1:])], "stats_s": [b - a for a, b in zip(stats, stats[1:])],
           "total_s": ended - began, "setup_s": marks[0] - began, "plain_forward_s": plain}
    if prof is not None:
        out["profile"] = _profile_summary(prof, ended - began)
    return out


def _profile_summary(prof, wall: float) -> dict:
    """Top functions by own time, and the cumulative time of EVA's phases, in seconds."""
    import pstats

    stats = pstats.Stats(prof).stats
    rows = [(f"{func[2]} ({os.path.basename(func[0])}:{func[1]})", tt, ct) for func, (_, _, tt, ct, _) in stats.items()]
    top = sorted(rows, key=lambda r: -r[1])[:12]
    phases = {}
    for name, _, ct in rows:
        short = name.split(" ")[0]
        for key in PROFILED:
            if key.split(".")[-1] == short:
                phases[key] = max(phases.get(key, 0.0), ct)
    return {"wall_s": wall, "top_tottime": [[n, round(t, 3)] for n, t, _ in top],
            "cumulative": {k: round(v, 3) for k, v in phases.items()}}


LLAMA_RUNS = (("peft", 1), ("ours", 1), ("ours", 3))


def llama_case(steps: int, rounds: int, profile: bool) -> dict:
    import tempfile

    from tests.harness.pool import WorkerPool

    batches = llama_batches(steps + 1)
    results: dict[str, list] = {f"{m}-w{w}": [] for m, w in LLAMA_RUNS}
    profiles = {}
    with tempfile.TemporaryDirectory(prefix="eva-llama-") as tmp:
        hf_dir = save_llama(tmp)
        for r in range(rounds + int(profile)):
            prof = profile and r == rounds
            for method, world in LLAMA_RUNS:
                with WorkerPool(world, collective_timeout_s=900) as pool:
                    res = pool.run(llama_job, method, hf_dir, batches, steps, prof, timeout=1800)
                key = f"{method}-w{world}"
                if prof:
                    profiles[key] = res[0]["profile"]
                    continue
                merged = {"step_s": [max(x["step_s"][i] for x in res) for i in range(steps)],
                          "stats_s": [max(x["stats_s"][i] for x in res) for i in range(steps)],
                          "total_s": max(x["total_s"] for x in res), "setup_s": max(x["setup_s"] for x in res),
                          "plain_forward_s": max(x["plain_forward_s"] for x in res)}
                merged["per_step_s"] = _median(merged["step_s"][1:])
                merged["stats_per_step_s"] = _median(merged["stats_s"][1:])
                results[key].append(merged)
                print(f"llama round {r}: {key} {merged['per_step_s']:.3f} s/step, statistics "
                      f"{merged['stats_per_step_s']:.3f} s/step (first step {merged['step_s'][0]:.2f} s, "
                      f"plain forward {merged['plain_forward_s']:.3f} s)", flush=True)
    ratios = []
    for i in range(rounds):
        peft_s, w1, tp3 = (results[f"{m}-w{w}"][i]["per_step_s"] for m, w in LLAMA_RUNS)
        peft_st, w1_st, tp3_st = (results[f"{m}-w{w}"][i]["stats_per_step_s"] for m, w in LLAMA_RUNS)
        ratios.append({"peft_over_ours_w1": peft_s / w1, "ours_w1_over_tp3": w1 / tp3, "peft_over_ours_tp3": peft_s / tp3,
                       "statistics_peft_over_ours_w1": peft_st / w1_st, "statistics_ours_w1_over_tp3": w1_st / tp3_st})
    summary = {k: _median([r[k] for r in ratios]) for k in ratios[0]}
    return {"setup": {**LLAMA, "batch": LLAMA_BATCH, "seq": LLAMA_SEQ, "r": LLAMA_R, "rho": 2.0, "tau": 0.99,
                      "steps": steps, "rounds": rounds, "targets_peft": HF_TARGETS, "targets_ours": MCORE_TARGETS,
                      "per_step": "median over steps 2.. of the time between two batches (slowest rank)",
                      "statistics": "wall time per step in EVA's statistics: PEFT's SVDHook calls (inside its "
                                    "forward; its rank allocation is a nested function, not timed: ~0.05 s/step "
                                    "in the profile); ours StepQueue.flush, process_step and decide (the hooks "
                                    "only queue rows); slowest rank, median over steps 2..",
                      "plain_forward": "one full forward of the bare model, no hooks (ours: no early stop)"},
            "runs": results, "ratios_per_round": ratios, "ratios": summary, "profiles": profiles}


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def llama_table(case: dict) -> str:
    lines = ["| run | s/step | of which statistics | first step s | plain forward s | PEFT / this (per step) |",
             "|---|---|---|---|---|---|"]
    peft_step = _median([r["per_step_s"] for r in case["runs"]["peft-w1"]])
    for key, runs in case["runs"].items():
        step = _median([r["per_step_s"] for r in runs])
        lines.append(f"| {key} | {step:.3f} | {_median([r['stats_per_step_s'] for r in runs]):.3f} | "
                     f"{_median([r['step_s'][0] for r in runs]):.2f} | "
                     f"{_median([r['plain_forward_s'] for r in runs]):.3f} | {peft_step / step:.2f} |")
    ratios = case["ratios"]
    lines.append("")
    lines.append(f"Per-round ratios (median): PEFT/ours at world 1 {ratios['peft_over_ours_w1']:.2f}x per step "
                 f"({ratios['statistics_peft_over_ours_w1']:.1f}x in the statistics); ours world 1 / TP=3 "
                 f"{ratios['ours_w1_over_tp3']:.2f}x per step and token ({ratios['statistics_ours_w1_over_tp3']:.2f}x "
                 f"in the statistics).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/eva.json")
    parser.add_argument("--cases", default="small,llama", help="small: the DP comparison; llama: the 135M shape")
    parser.add_argument("--worlds", default="2,4")
    parser.add_argument("--batches", type=int, default=6, help="batches per rank (EVA cycles through them)")
    parser.add_argument("--llama-steps", type=int, default=8, help="EVA steps per llama run")
    parser.add_argument("--llama-rounds", type=int, default=2, help="interleaved rounds of the three llama runs")
    parser.add_argument("--profile", action="store_true", help="one more (untimed) llama round under cProfile")
    args = parser.parse_args()
    _quiet()
    cases = set(args.cases.split(","))
    doc = {"benchmark": "eva", "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}}
    tables = []
    if "small" in cases:
        doc.update(small_case(args.worlds, args.batches))
        tables.append(doc["table"])
    if "llama" in cases:
        doc["llama"] = llama_case(args.llama_steps, args.llama_rounds, args.profile)
        doc["llama_table"] = llama_table(doc["llama"])
        tables.append(doc["llama_table"])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(doc, fh, indent=1)
    print("\n\n".join(tables))


def small_case(worlds: str, batches: int) -> dict:
    """The DP comparison on the 4-layer stack (bytes, memory, agreement) and the training curves."""
    from tests.harness.pool import WorkerPool

    rows = []
    for world in [int(w) for w in worlds.split(",")]:
        per_rank = make_batches(world, batches)
        exact = exact_components(per_rank)
        for method in METHODS:
            with WorkerPool(world, collective_timeout_s=600) as pool:
                results = pool.run(eva_job, method, per_rank, timeout=1800)
            rows.append(summarize(method, world, results, exact))
            print(f"world {world} {method}: {rows[-1]['steps']} steps, {rows[-1]['wall_s']:.1f} s", flush=True)
    curves = training_curves()
    return {
        "setup": {"hidden": HIDDEN, "layers": LAYERS, "vocab": VOCAB, "tokens_per_rank_per_batch": BATCH * SEQ,
                  "batches_per_rank": batches, "r": R, "rho": RHO, "tau": TAU,
                  "bytes": "payload each rank passes to collectives (all-gather: its own part), per EVA step "
                           "(forward pass); bytes_received counts an all-gather's world x parts",
                  "peak_rss": "ru_maxrss after resetting the high-water mark just before EVA (fresh pool per method)"},
        "results": rows, "training_curves": curves, "table": table(rows, curves),
    }


if __name__ == "__main__":
    main()
