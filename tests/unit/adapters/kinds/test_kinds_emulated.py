"""IA3 (output and input scaling), LoHa and LoKr (both factors whole; both rank-1 products) on
emulated tensor parallelism (one process, TP 1, 2, 4 and 8, float64), column and row hosts,
sequence parallelism off and on, against dense references written here from PEFT's formulas:

    IA3 output:  y = (x W^T + b) * l        IA3 input:  y = (x * l) W^T + b
    LoHa:        y = x (W + s (w1a w1b) * (w2a w2b))^T + b
    LoKr:        y = x (W + s (w1 kron w2))^T + b,   s = alpha / r

Each emulated rank is its own host (geometry of rank i of t, GROUP_OF_ONE), every adapter tensor
set from one random full tensor (scales not 1, no zero factor), as tests/unit/adapters/kinds/
test_dora_emulated.py does: column ranks see all of x and dx is summed over ranks; row ranks run in
threads that meet in the one emulated reduction.  Checked within 1e-10: the output, the input
gradient, and every adapter tensor's gradient (split tensors: the ranks' shards; replicated ones
with a TP-partial gradient: summed over ranks, as finalize_grads does; others: each rank's whole).
The layers on real gloo ranks (TP 1/2/4) are tests/distributed/test_ia3_loha_layers.py and
test_lokr_layers.py.
"""
import threading

import pytest
import torch
from torch import nn

from parallel_adapters import IA3Config, LoHaConfig, LoKrConfig
from parallel_adapters.adapters.hosts.linear import ColumnParallelHost, RowParallelHost
from parallel_adapters.adapters.kinds import get_kind
from parallel_adapters.distributed.groups import GROUP_OF_ONE
from parallel_adapters.distributed.sharding import ShardSpec
from parallel_adapters.mcore.compat import LinearGeometry
from tests.unit.adapters.kinds.test_dora_emulated import _EmulatedReduction

TOL = 1e-10
S, B, SMALL, BIG = 8, 2, 16, 64  # LoKr: 64 = 8 x 8, so w1's 8 rows (column) / columns (row) split up to TP 8
VARIANTS = {  # name: (kind, config)
    "ia3-output": ("ia3", IA3Config(target_modules=["proj"], feedforward_modules=[])),
    "ia3-input": ("ia3", IA3Config(target_modules=["proj"], feedforward_modules=["proj"])),
    "loha": ("loha", LoHaConfig(r=3, alpha=6.0, target_modules=["proj"])),
    "lokr-whole": ("lokr", LoKrConfig(r=8, alpha=6.0, target_modules=["proj"])),
    "lokr-products": ("lokr", LoKrConfig(r=1, alpha=3.0, decompose_both=True, target_modules=["proj"])),
}


def reference(variant, x, w, bias, t):
    """The dense formula on leaves (module docstring)."""
    config = VARIANTS[variant][1]
    if variant == "ia3-output":
        return (x @ w.T + bias) * t["ia3_l"].flatten()
    if variant == "ia3-input":
        return (x * t["ia3_l"].flatten()) @ w.T + bias
    s = config.alpha / config.r
    if variant == "loha":
        delta = s * (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
    else:
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
        delta = s * torch.kron(w1, w2)
    return x @ (w + delta).T + bias


def _hosts(variant, mode, tp, sp, seed):
    """One host per emulated rank, their tensors the shards of one random full set; and the problem."""
    kind_name, config = VARIANTS[variant]
    kind = get_kind(kind_name)
    in_f, out_f = (SMALL, BIG) if mode == "column" else (BIG, SMALL)
    g = torch.Generator().manual_seed(seed)
    mk = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    p = dict(x=mk(S, B, in_f), w=mk(out_f, in_f), bias=mk(out_f), dy=mk(S, B, out_f))
    w_spec = ShardSpec(dim=0 if mode == "column" else 1)
    hosts, full = [], None
    for rank in range(tp):
        w = w_spec.shard(p["w"], rank, tp)
        base = nn.Linear(w.shape[1], w.shape[0]).double().requires_grad_(False)
        with torch.no_grad():
            base.weight.copy_(w)
            base.bias.copy_(ShardSpec(dim=0).shard(p["bias"], rank, tp) if mode == "column" else p["bias"])
        geometry = LinearGeometry(mode, in_f, out_f, 1, GROUP_OF_ONE, tp, rank, sp, False, True, False)
        host = (ColumnParallelHost if mode == "column" else RowParallelHost)(base, geometry, "proj")
        settings = kind.settings(config, "proj", geometry)
        if full is None:
            full = {d.name: 1 + 0.5 * mk(*d.global_shape) for d in kind.tensors(geometry, settings.hparams)}
        host.add_adapter("default", kind, settings, full)
        host.eval()
        hosts.append(host)
    return hosts, p, full


def _reference(variant, p, full):
    leaves = {n: t.clone().requires_grad_() for n, t in full.items()}
    x = p["x"].clone().requires_grad_()
    y = reference(variant, x, p["w"], p["bias"], leaves)
    y.backward(p["dy"])
    return y.detach(), x.grad, {n: t.grad for n, t in leaves.items()}


def _check_grads(hosts, grads, tp):
    partial = {id(q) for q in hosts[0].partial_grad_parameters()}
    for decl in hosts[0].tensor_decls("default"):
        got = [h.adapter_tensors("default")[decl.name].grad for h in hosts]
        if not decl.spec.replicated:
            want, have = grads[decl.name], decl.spec.unshard(got)
        elif tp > 1 and id(hosts[0].adapter_tensors("default")[decl.name]) in partial:
            want, have = grads[decl.name], sum(got)
        else:
            want, have = grads[decl.name].expand(tp, *grads[decl.name].shape), torch.stack(got)
        torch.testing.assert_close(have, want, atol=TOL, rtol=0, msg=decl.name)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
@pytest.mark.parametrize("sp", [False, True])
def test_column_host(variant, tp, sp):
    hosts, p, full = _hosts(variant, "column", tp, sp, seed=tp)
    y_ref, dx_ref, grads = _reference(variant, p, full)
    out_spec = ShardSpec(dim=2)
    ys, dxs = [], []
    for rank, host in enumerate(hosts):
        x = p["x"].clone().requires_grad_()
        y, _ = host(x)
        y.backward(out_spec.shard(p["dy"], rank, tp))
        ys.append(y.detach()), dxs.append(x.grad)
    torch.testing.assert_close(out_spec.unshard(ys), y_ref, atol=TOL, rtol=0)
    torch.testing.assert_close(sum(dxs), dx_ref, atol=TOL, rtol=0)
    _check_grads(hosts, grads, tp)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
@pytest.mark.parametrize("sp", [False, True])
def test_row_host(variant, tp, sp):
    hosts, p, full = _hosts(variant, "row", tp, sp, seed=100 + tp)
    y_ref, dx_ref, grads = _reference(variant, p, full)
    reduction, in_spec, seq = _EmulatedReduction(tp, sp), ShardSpec(dim=2), ShardSpec(dim=0)
    xs = [in_spec.shard(p["x"], rank, tp).clone().requires_grad_() for rank in range(tp)]
    ys = [None] * tp

    def run(rank):
        hosts[rank]._reduce = reduction.for_rank(rank)
        ys[rank] = hosts[rank](xs[rank])[0]

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(tp)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    local = (lambda t, rank: seq.shard(t, rank, tp)) if sp else (lambda t, rank: t)  # noqa: E731
    sum((y * local(p["dy"], rank)).sum() for rank, y in enumerate(ys)).backward()
    for rank, y in enumerate(ys):
        torch.testing.assert_close(y.detach(), local(y_ref, rank), atol=TOL, rtol=0)
    torch.testing.assert_close(in_spec.unshard([x.grad for x in xs]), dx_ref, atol=TOL, rtol=0)
    _check_grads(hosts, grads, tp)
