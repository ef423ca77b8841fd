#!/usr/bin/env python
"""EVA benchmark (DESIGN.md section 9): ours vs PEFT 0.21.2's EVA with gather_distributed_inputs=True.

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
(tests/unit/eva/test_initialize_single.py).  Writes JSON and prints a markdown table.

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
    from parallel_adapters.eva.initialize import get_eva_state_dict
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
            state = get_eva_state_dict(adapted, batches, forward_fn=forward, show_progress_bar=False)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/eva.json")
    parser.add_argument("--worlds", default="2,4")
    parser.add_argument("--batches", type=int, default=6, help="batches per rank (EVA cycles through them)")
    args = parser.parse_args()
    _quiet()
    from tests.harness.pool import WorkerPool

    rows = []
    for world in [int(w) for w in args.worlds.split(",")]:
        per_rank = make_batches(world, args.batches)
        exact = exact_components(per_rank)
        for method in METHODS:
            with WorkerPool(world, collective_timeout_s=600) as pool:
                results = pool.run(eva_job, method, per_rank, timeout=1800)
            rows.append(summarize(method, world, results, exact))
            print(f"world {world} {method}: {rows[-1]['steps']} steps, {rows[-1]['wall_s']:.1f} s", flush=True)
    curves = training_curves()
    doc = {
        "benchmark": "eva", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "setup": {"hidden": HIDDEN, "layers": LAYERS, "vocab": VOCAB, "tokens_per_rank_per_batch": BATCH * SEQ,
                  "batches_per_rank": args.batches, "r": R, "rho": RHO, "tau": TAU,
                  "bytes": "payload each rank passes to collectives (all-gather: its own part), per EVA step "
                           "(forward pass); bytes_received counts an all-gather's world x parts",
                  "peak_rss": "ru_maxrss after resetting the high-water mark just before EVA (fresh pool per method)"},
        "results": rows, "training_curves": curves,
    }
    doc["table"] = table(rows, curves)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(doc, fh, indent=1)
    print(doc["table"])


if __name__ == "__main__":
    main()
