"""DoRA on emulated tensor parallelism (one process, TP 1..8, float64), column and row hosts,
sequence parallelism off and on, eval and dropout, against a dense reference written here.

Each emulated rank is its own host (geometry of rank i of t, GROUP_OF_ONE).  Column: every rank
sees all of x (the emulated all-gather) and dx is summed over ranks (the copy_to all-reduce /
reduce-scatter).  Row: the ranks' forwards run in threads that meet in the ONE reduction, which
is emulated on the packed payload with the real collectives' gradient rules (all-reduce: identity
backward; reduce-scatter: the chunk of a sum, so backward gathers); one backward runs over all
ranks at once.  Dropout: each rank's slice of one full mask.
"""
import threading

import pytest
import torch
from torch import nn

from parallel_adapters.adapters.hosts.linear import ColumnParallelHost, RowParallelHost
from parallel_adapters.adapters.kinds.dora import DORA, MAGNITUDE
from parallel_adapters.adapters.kinds.protocol import AdapterSettings
from parallel_adapters.distributed.groups import GROUP_OF_ONE
from parallel_adapters.distributed.sharding import ShardSpec
from parallel_adapters.mcore.compat import LinearGeometry

TOL = 1e-10
S, B, SMALL, BIG, R, SCALE, P = 24, 2, 16, 48, 4, 0.75, 0.3


def dora_reference(x, w, bias, a, b, m, dropped):
    f = m / torch.linalg.norm(w + SCALE * (b @ a), dim=1).detach()
    if dropped is None:
        return f * (x @ w.T + SCALE * (x @ a.T) @ b.T) + bias
    return x @ w.T + bias + (f - 1) * (dropped @ w.T) + f * SCALE * ((dropped @ a.T) @ b.T)


def _problem(seed, in_f, out_f):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    w, a, b = mk(out_f, in_f), mk(R, in_f), mk(out_f, R)
    m = torch.linalg.norm(w + SCALE * b @ a, dim=1) * (1 + 0.5 * torch.rand(out_f, generator=g, dtype=torch.float64))
    mask = (torch.rand(S, B, in_f, generator=g, dtype=torch.float64) >= P).double() / (1 - P)
    return dict(x=mk(S, B, in_f), w=w, bias=mk(out_f), a=a, b=b, m=m, dy=mk(S, B, out_f), mask=mask)


def _reference(p, dropout):
    leaves = {k: p[k].clone().requires_grad_() for k in ("x", "a", "b", "m", "bias")}
    y = dora_reference(leaves["x"], p["w"], leaves["bias"], leaves["a"], leaves["b"], leaves["m"],
                       leaves["x"] * p["mask"] if dropout else None)
    y.backward(p["dy"])
    return y.detach(), {k: t.grad for k, t in leaves.items()}


def _hosts(cls, mode, tp, chunks, sp, p, dropout):
    w_spec = ShardSpec(dim=0 if mode == "column" else 1, chunks=chunks)
    hparams = {"r": R, "lora_alpha": SCALE * R, "scaling": SCALE}
    full = {"lora_A": p["a"], "lora_B": p["b"], MAGNITUDE: p["m"]}
    hosts = []
    for rank in range(tp):
        w = w_spec.shard(p["w"], rank, tp)
        base = nn.Linear(w.shape[1], w.shape[0], bias=mode == "column").double().requires_grad_(False)
        with torch.no_grad():
            base.weight.copy_(w)
            if mode == "column":
                base.bias.copy_(w_spec.shard(p["bias"], rank, tp))
        g = LinearGeometry(mode, p["x"].shape[-1], p["w"].shape[0], chunks, GROUP_OF_ONE, tp, rank, sp, False, True,
                           False)
        host = cls(base, g, "proj")
        host.add_adapter("default", DORA, AdapterSettings(hparams), full)
        m_spec = host.tensor_decls("default")[2].spec
        with torch.no_grad():  # the init read only this shard's norms (GROUP_OF_ONE): set m itself
            host.adapter_tensors("default")[MAGNITUDE].copy_(m_spec.shard(p["m"], rank, tp))
        mask = p["mask"] if mode == "column" else ShardSpec(dim=2, chunks=chunks).shard(p["mask"], rank, tp)
        host._dropout["default"] = (lambda t, mask=mask: t * mask) if dropout else None
        host.train(dropout)
        hosts.append(host)
    return hosts


def _check_grads(hosts, grads, tp):
    """Split tensors: this rank's shard; replicated ones: summed over ranks exactly when the
    host says finalize_grads sums them, else every rank's equals the whole gradient."""
    ref = {"lora_A": grads["a"], "lora_B": grads["b"], MAGNITUDE: grads["m"]}
    for decl in hosts[0].tensor_decls("default"):
        got = [h.adapter_tensors("default")[decl.name].grad for h in hosts]
        summed = tp > 1 and id(hosts[0].adapter_tensors("default")[decl.name]) in {
            id(q) for q in hosts[0].partial_grad_parameters()}
        if not decl.spec.replicated:
            torch.testing.assert_close(decl.spec.unshard(got), ref[decl.name], atol=TOL, rtol=0, msg=decl.name)
        elif summed:
            torch.testing.assert_close(sum(got), ref[decl.name], atol=TOL, rtol=0, msg=decl.name)
        else:
            for g in got:
                torch.testing.assert_close(g, ref[decl.name], atol=TOL, rtol=0, msg=decl.name)


@pytest.mark.parametrize("tp", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("chunks", [1, 2])
@pytest.mark.parametrize("sp", [False, True])
@pytest.mark.parametrize("dropout", [False, True])
def test_column_host(tp, chunks, sp, dropout):
    if BIG % (tp * chunks):
        pytest.skip("does not split")
    p = _problem(tp + 10 * chunks, SMALL, BIG)
    y_ref, grads = _reference(p, dropout)
    hosts = _hosts(ColumnParallelHost, "column", tp, chunks, sp, p, dropout)
    out_spec = ShardSpec(dim=2, chunks=chunks)
    ys, dxs = [], []
    for rank, host in enumerate(hosts):
        x = p["x"].clone().requires_grad_()
        y, _ = host(x)
        y.backward(out_spec.shard(p["dy"], rank, tp))
        ys.append(y.detach()), dxs.append(x.grad)
    torch.testing.assert_close(out_spec.unshard(ys), y_ref, atol=TOL, rtol=0)
    torch.testing.assert_close(sum(dxs), grads["x"], atol=TOL, rtol=0)
    _check_grads(hosts, grads, tp)
    assert all(not list(h.partial_grad_parameters()) or tp > 1 for h in hosts)


class _EmulatedReduction:
    """The row hosts' ONE collective across emulated ranks running in threads."""

    def __init__(self, tp, sp):
        self.tp, self.sp, self.flats, self.barrier = tp, sp, [None] * tp, threading.Barrier(tp)

    def for_rank(self, rank):
        def reduce(flat):
            self.flats[rank] = flat
            self.barrier.wait()
            if self.sp:  # reduce-scatter: this rank's chunk of the sum (backward: the gather)
                return sum(self.flats).chunk(self.tp)[rank]
            return flat + sum(f.detach() for j, f in enumerate(self.flats) if j != rank)  # identity backward
        return reduce


@pytest.mark.parametrize("tp", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("sp", [False, True])
@pytest.mark.parametrize("dropout", [False, True])
def test_row_host(tp, sp, dropout):
    p = _problem(100 + tp, BIG, SMALL)
    y_ref, grads = _reference(p, dropout)
    hosts = _hosts(RowParallelHost, "row", tp, 1, sp, p, dropout)
    reduction, in_spec, seq = _EmulatedReduction(tp, sp), ShardSpec(dim=2), ShardSpec(dim=0)
    xs = [in_spec.shard(p["x"], rank, tp).clone().requires_grad_() for rank in range(tp)]
    ys = [None] * tp

    def run(rank):
        hosts[rank]._reduce = reduction.for_rank(rank)
        ys[rank] = hosts[rank](xs[rank])[0] + p["bias"]  # the bias (a base parameter here) after the reduction

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(tp)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    local = (lambda t, rank: seq.shard(t, rank, tp)) if sp else (lambda t, rank: t)  # noqa: E731
    sum((y * local(p["dy"], rank)).sum() for rank, y in enumerate(ys)).backward()
    for rank, y in enumerate(ys):
        torch.testing.assert_close(y.detach(), local(y_ref, rank), atol=TOL, rtol=0)
    torch.testing.assert_close(in_spec.unshard([x.grad for x in xs]), grads["x"], atol=TOL, rtol=0)
    _check_grads(hosts, grads, tp)
