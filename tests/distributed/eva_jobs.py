"""EVA test models, data and multi-rank jobs (module-level, plain args, run by WorkerPool).

The data are built so that the checks mean something: every layer input is a low-rank signal
with well separated singular values (+ small noise), so components and rank allocations are
well defined, and a distributed run can be compared with a single-process one on the same
GLOBAL batches (each DP rank gets its slice; the reference sees the whole batch).
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn

VOCAB, HIDDEN = 256, 32
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ----------------------------------------------------------------------------------------------
# A Hugging Face style block of plain nn.Linear layers (q/k/v and gate/up share their inputs)
# ----------------------------------------------------------------------------------------------

def gap_table(seed: int, decay: float, rows: int = VOCAB, cols: int = HIDDEN, rank: int = 10,
              noise: float = 1e-3, scale: float = 10.0) -> torch.Tensor:
    """rows x cols: rank `rank` with singular values scale * decay**j (+ noise)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(rows, rank, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(cols, rank, generator=g, dtype=torch.float64)).Q
    s = scale * torch.tensor([decay ** j for j in range(rank)], dtype=torch.float64)
    return u @ torch.diag(s) @ v.T + noise * torch.randn(rows, cols, generator=g, dtype=torch.float64)


class Block(nn.Module):
    """q/k/v read one embedding (one tensor object), o another, gate/up a third, down their product."""

    def __init__(self, decays=(0.5, 0.6, 0.7), dtype=torch.float32, extra_noise_layer: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.ModuleList([nn.Embedding(VOCAB, HIDDEN) for _ in decays])
        for i, (e, d) in enumerate(zip(self.emb, decays)):
            e.weight.data.copy_(gap_table(i, d))
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(HIDDEN, HIDDEN) for _ in range(4))
        self.gate_proj, self.up_proj = nn.Linear(HIDDEN, 2 * HIDDEN), nn.Linear(HIDDEN, 2 * HIDDEN)
        self.down_proj = nn.Linear(2 * HIDDEN, HIDDEN)
        self.noise_proj = nn.Linear(HIDDEN, HIDDEN) if extra_noise_layer else None
        self.to(dtype)

    def forward(self, input_ids, attention_mask=None, labels=None):
        x = self.emb[0](input_ids)
        y = self.q_proj(x) + self.k_proj(x) + self.v_proj(x) + self.o_proj(self.emb[1](input_ids))
        h = self.emb[2](input_ids)
        y = y + self.down_proj(torch.nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))
        if self.noise_proj is not None:  # fresh isotropic noise each call: never converges
            y = y + self.noise_proj(torch.randn_like(x))
        return y


def token_batches(n: int, batch: int, seq: int, seed: int = 5, pad: float = 0.2, vocab: int = VOCAB,
                  labels: bool = False) -> list[dict]:
    """Random token batches with ~`pad` of the tokens masked (and, optionally, labels with -100)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        b = {"input_ids": torch.randint(0, vocab, (batch, seq), generator=g),
             "attention_mask": (torch.rand(batch, seq, generator=g) > pad).long()}
        if labels:
            lab = torch.randint(0, vocab, (batch, seq), generator=g)
            lab[torch.rand(batch, seq, generator=g) < 0.1] = -100
            b["labels"] = lab
        out.append(b)
    return out


def dp_slice(batches: list[dict], dp_rank: int, dp_size: int) -> list[dict]:
    """This DP rank's contiguous slice of every global batch."""
    return [{k: v.chunk(dp_size)[dp_rank] for k, v in b.items()} for b in batches]


def lora_config(targets=TARGETS, r=4, alpha=8, rho=2.0, tau=0.99, **eva_kw):
    from parallel_adapters import EvaConfig, LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights="eva",
                      eva_config=EvaConfig(rho=rho, tau=tau, **eva_kw))


def full_state(state: dict, groups) -> dict:
    """{name: (rank, alpha, FULL components)} (row shards all-gathered over TP)."""
    out = {}
    for name, s in state.items():
        comps = s.components
        if not s.spec.replicated and groups.tp_size > 1:
            parts = [torch.empty_like(comps) for _ in range(groups.tp_size)]
            dist.all_gather(parts, comps.contiguous(), group=groups.tp_group)
            comps = s.spec.unshard(parts)
        out[name] = (s.rank, s.alpha, comps.clone())
    return out


def _gather_pp(obj, groups):
    if groups.pp_size == 1:
        return [obj]
    out = [None] * groups.pp_size
    dist.all_gather_object(out, obj, group=groups.pp_group)
    return out


# ----------------------------------------------------------------------------------------------
# Jobs on plain modules with data parallelism (cheap: no megatron model)
# ----------------------------------------------------------------------------------------------

def _dp_groups():
    from parallel_adapters import ParallelGroups

    return ParallelGroups(dp_group=dist.group.WORLD, dp_size=dist.get_world_size(), dp_rank=dist.get_rank())


def block_eva_job(batches: list[dict], per_rank: bool, max_steps: int = 100, tau: float = 0.99,
                  noise_layer: bool = False, mask_rank: int | None = None, count: bool = True) -> dict:
    """EVA on Block under DP = world size.  per_rank: `batches` is a list per rank (different data);
    else every rank takes its DP slice of the global batches.  mask_rank: that rank's attention
    mask is all zeros.  Returns ranks, full components, warnings and collective counts."""
    from parallel_adapters import get_adapter_model
    from parallel_adapters.eva.initialize import get_eva_layer_states
    from tests.harness import counting

    groups = _dp_groups()
    mine = batches[groups.dp_rank] if per_rank else dp_slice(batches, groups.dp_rank, groups.dp_size)
    if mask_rank == groups.dp_rank:
        mine = [{**b, "attention_mask": torch.zeros_like(b["attention_mask"])} for b in mine]
    targets = TARGETS + (("noise_proj",) if noise_layer else ())
    model = get_adapter_model(Block(extra_noise_layer=noise_layer), lora_config(targets, tau=tau, max_steps=max_steps),
                              groups=groups)
    gathered = []  # all-gather bytes so far, at each forward: the deltas are per step

    def forward(m, b):
        gathered.append(counting.snapshot()["all_gather_into_tensor"]["bytes"])
        return m(**{k: v for k, v in b.items() if k != "labels"})

    with warnings.catch_warnings(record=True) as caught, counting.counted() as c:
        warnings.simplefilter("always")
        state = get_eva_layer_states(model, mine, forward_fn=forward, show_progress_bar=False)
        gathered.append(counting.snapshot()["all_gather_into_tensor"]["bytes"])
    return {"state": full_state(state, groups), "steps": len(gathered) - 1,
            "step_bytes": [b - a for a, b in zip(gathered, gathered[1:])],
            "warnings": [str(w.message) for w in caught if "EVA" in str(w.message)],
            "calls": dict(c.calls), "bytes": dict(c.bytes) if count else {}}


def block_no_gather_job(per_rank: list[list[dict]]) -> dict:
    """gather_distributed_inputs=False under DP = world size: each rank's EVA on its own batches
    alone, and the same EVA in this process with ParallelGroups.single() (the reference)."""
    from parallel_adapters import ParallelGroups, get_adapter_model
    from parallel_adapters.eva.initialize import get_eva_layer_states
    from tests.harness import counting

    groups = _dp_groups()
    mine = per_rank[groups.dp_rank]
    model = get_adapter_model(Block(), lora_config(), groups=groups)
    with counting.counted() as c:
        state = get_eva_layer_states(model, mine, gather_distributed_inputs=False, show_progress_bar=False)
    alone = get_adapter_model(Block(), lora_config(), groups=ParallelGroups.single())
    reference = get_eva_layer_states(alone, mine, show_progress_bar=False)
    return {"state": full_state(state, groups), "reference": full_state(reference, ParallelGroups.single()),
            "calls": dict(c.calls)}


def block_reference(batches: list[dict], max_steps: int = 100, tau: float = 0.99, with_steps: bool = False):
    """The same EVA in one process (ParallelGroups.single()) on the whole global batches."""
    from parallel_adapters import ParallelGroups, get_adapter_model
    from parallel_adapters.eva.initialize import get_eva_layer_states

    model = get_adapter_model(Block(), lora_config(tau=tau, max_steps=max_steps), groups=ParallelGroups.single())
    steps = []
    forward = lambda m, b: (steps.append(1), m(**{k: v for k, v in b.items() if k != "labels"}))  # noqa: E731
    state = full_state(get_eva_layer_states(model, batches, forward_fn=forward, show_progress_bar=False),
                       ParallelGroups.single())
    return (state, len(steps)) if with_steps else state


# ----------------------------------------------------------------------------------------------
# Jobs on a tiny Megatron GPT (TP / SP / DP / PP)
# ----------------------------------------------------------------------------------------------

GPT_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
GPT_KW = dict(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
              vocab_size=VOCAB, params_dtype=torch.float64)


def _gpt(tp: int, pp: int, sp: bool, decay: float = 0.55):
    """This rank's GPT stage (TP/PP-invariant init) whose token embeddings have a clear spectral gap."""
    from parallel_adapters.distributed.sharding import ShardSpec
    from parallel_adapters.mcore import compat, cpu
    from parallel_adapters.mcore.gpt import GPTSettings, build_gpt

    cpu.enable_cpu_mode()
    groups = compat.initialize_model_parallel(tp, pp)  # collective: every rank of the world
    settings = GPTSettings(sequence_parallel=sp, **GPT_KW)
    cpu.model_parallel_seed(settings.seed)
    model = build_gpt(settings)
    if groups.is_first_stage:
        table = gap_table(40, decay, rows=VOCAB, cols=settings.hidden_size, noise=1e-3, scale=30.0)
        emb = model.embedding.word_embeddings.weight
        with torch.no_grad():
            emb.copy_(ShardSpec(dim=0).shard(table, groups.tp_rank, groups.tp_size))
    return model, groups


def gpt_eva(tp: int, pp: int, sp: bool, batches: list[dict], targets=GPT_TARGETS, single: bool = False,
            **config_kw) -> dict:
    """EVA on the GPT at TP x PP (DP = the rest), every DP rank on its slice of the global batches.
    single=True: the world-1 reference (TP=PP=1 model, ParallelGroups.single(), whole batches)."""
    from parallel_adapters import ParallelGroups, get_adapter_model
    from parallel_adapters.eva.initialize import get_eva_layer_states
    from tests.harness import counting

    model, groups = _gpt(tp, pp, sp)
    if single:  # a world of one inside the pool: megatron's size-1 TP group stands for every group
        # (ParallelGroups.single()'s None groups would mean the default group to collectives.py)
        groups = ParallelGroups(tp_group=groups.tp_group, pp_group=groups.tp_group, dp_group=groups.tp_group)
        if dist.get_rank() != 0:  # only rank 0 computes the reference
            return {}
    adapted = get_adapter_model(model, lora_config(targets, **config_kw), groups=groups)
    mine = dp_slice(batches, groups.dp_rank, groups.dp_size)
    with warnings.catch_warnings(record=True) as caught, counting.counted() as c:
        warnings.simplefilter("always")
        state = get_eva_layer_states(adapted, mine, show_progress_bar=False)
    full = {}
    for stage in _gather_pp(full_state(state, groups), groups):
        full.update(stage)
    return {"state": full, "calls": dict(c.calls), "bytes": dict(c.bytes), "stage": groups.pp_rank,
            "local": sorted(state), "warnings": [str(w.message) for w in caught if "EVA" in str(w.message)]}


def gpt_compare_job(tp: int, pp: int, sp: bool, batches: list[dict], **config_kw) -> dict:
    """The distributed run, and on global rank 0 also the world-1 reference (computed first)."""
    from parallel_adapters.mcore import compat

    ref = gpt_eva(1, 1, False, batches, single=True, **config_kw)
    compat.destroy_model_parallel()
    dist.barrier()
    out = gpt_eva(tp, pp, sp, batches, **config_kw)
    out["reference"] = ref.get("state")
    return out


def gpt_persist_job(directory: str, batches: list[dict]) -> dict:
    """TP=2: EVA -> save -> load -> initialize (B = 0, logits unchanged); then the same directory
    loaded into a TP=1 model (DP=2) must give the same full A (row components resharded)."""
    from parallel_adapters import get_adapter_model
    from parallel_adapters.eva.initialize import get_eva_layer_states, initialize_eva_weights
    from parallel_adapters.eva.persist import load_eva_state, save_eva_state
    from parallel_adapters.mcore import compat
    from parallel_adapters.mcore.gpt import gpt_logits

    ids = batches[0]["input_ids"]
    model, groups = _gpt(2, 1, False)
    adapted = get_adapter_model(model, lora_config(GPT_TARGETS), groups=groups)
    with torch.no_grad():
        before = gpt_logits(adapted.model, ids)
    state = get_eva_layer_states(adapted, batches, show_progress_bar=False)
    save_eva_state(directory, state, groups, adapted.peft_config["default"].to_dict())
    loaded = load_eva_state(directory, groups)
    same_loaded = all(torch.equal(loaded[n].components, s.components) and loaded[n].rank == s.rank
                      and loaded[n].alpha == s.alpha for n, s in state.items())
    initialize_eva_weights(adapted, eva_state_dict=loaded)
    with torch.no_grad():
        after = gpt_logits(adapted.model, ids)
    layers = dict((l.module_name, l) for _, l in adapted.adapter_layers())
    b_zero = all(not l.lora_B["default"].weight.any() for l in layers.values() if l.lora_A)
    a_tp2 = {n: full_state({n: loaded[n]}, groups)[n][2] for n in loaded}
    config = adapted.peft_config["default"]

    compat.destroy_model_parallel()
    model1, groups1 = _gpt(1, 1, False)
    adapted1 = get_adapter_model(model1, lora_config(GPT_TARGETS), groups=groups1)
    initialize_eva_weights(adapted1, eva_state_dict=load_eva_state(directory, groups1))
    a_tp1 = {l.module_name: l.lora_A["default"].weight.detach().clone() for _, l in adapted1.adapter_layers()
             if l.lora_A}
    return {"same_loaded": same_loaded, "b_zero": b_zero, "logits_equal": torch.equal(before, after),
            "ranks": {n: l.r["default"] for n, l in layers.items() if l.lora_A},
            "rank_pattern": dict(config.rank_pattern), "alpha_pattern": dict(config.alpha_pattern),
            "a_tp2": a_tp2, "a_tp1": a_tp1, "config1": adapted1.peft_config["default"].rank_pattern}
