"""Emulated tensor parallelism (one process, TP 1..8): the sharding rule and the gradient rules.

Reference: the dense float64 computation y = x W^T + s (x A^T) B^T.  Each emulated rank runs the
same per-shard math as the layers (functional.lora_down/lora_up on its ShardSpec slices); the
collectives are emulated by sum / concatenation.  The replicated factor's gradient is summed over
ranks exactly as finalize_grads does.
"""
import pytest
import torch
import torch.nn.functional as F

from parallel_adapters.adapters import functional as lf
from parallel_adapters.adapters.functional import lora_factor_specs
from parallel_adapters.distributed.sharding import ShardSpec

TOL = 1e-10


def _dense(x, w, a, b, s):
    return F.linear(x, w) + lf.lora_up(lf.lora_down(x, a), b, s)


def _problem(seed, tokens=6, in_f=16, out_f=24, r=4):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    return mk(tokens, in_f), mk(out_f, in_f), mk(r, in_f), mk(out_f, r), mk(tokens, out_f)


def _dense_grads(x, w, a, b, dy, s):
    x, a, b = (t.clone().requires_grad_() for t in (x, a, b))
    y = _dense(x, w, a, b, s)
    y.backward(dy)
    return y.detach(), x.grad, a.grad, b.grad


@pytest.mark.parametrize("tp", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("chunks", [1, 2])
def test_column_parallel_matches_dense(tp, chunks):
    s = 0.5
    x, w, a, b, dy = _problem(seed=tp * 10 + chunks, out_f=48)
    y_ref, dx_ref, da_ref, db_ref = _dense_grads(x, w, a, b, dy, s)
    w_spec = ShardSpec(dim=0, chunks=chunks)
    a_spec, b_spec = lora_factor_specs("column", chunks)
    out_spec = ShardSpec(dim=1, chunks=chunks)
    ys, dxs, das, dbs = [], [], [], []
    for rank in range(tp):
        xi = x.clone().requires_grad_()
        ai = a_spec.shard(a, rank, tp).clone().requires_grad_()
        bi = b_spec.shard(b, rank, tp).clone().requires_grad_()
        yi = _dense(xi, w_spec.shard(w, rank, tp), ai, bi, s)
        yi.backward(out_spec.shard(dy, rank, tp))
        ys.append(yi.detach()); dxs.append(xi.grad); das.append(ai.grad); dbs.append(bi.grad)
    torch.testing.assert_close(out_spec.unshard(ys), y_ref, atol=TOL, rtol=0)
    torch.testing.assert_close(sum(dxs), dx_ref, atol=TOL, rtol=0)  # the copy_to all-reduce
    torch.testing.assert_close(sum(das), da_ref, atol=TOL, rtol=0)  # finalize_grads
    torch.testing.assert_close(b_spec.unshard(dbs), db_ref, atol=TOL, rtol=0)
    assert a_spec.replicated and not b_spec.replicated


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_row_parallel_matches_dense(tp):
    s = 2.0
    x, w, a, b, dy = _problem(seed=100 + tp, in_f=32)
    y_ref, dx_ref, da_ref, db_ref = _dense_grads(x, w, a, b, dy, s)
    w_spec = in_spec = ShardSpec(dim=1)
    a_spec, b_spec = lora_factor_specs("row")
    partials, dxs, das, dbs = [], [], [], []
    for rank in range(tp):
        xi = in_spec.shard(x, rank, tp).clone().requires_grad_()
        ai = a_spec.shard(a, rank, tp).clone().requires_grad_()
        bi = b.clone().requires_grad_()
        pi = _dense(xi, w_spec.shard(w, rank, tp), ai, bi, s)
        pi.backward(dy)  # all-reduce backward is the identity: dy arrives complete
        partials.append(pi.detach()); dxs.append(xi.grad); das.append(ai.grad); dbs.append(bi.grad)
    torch.testing.assert_close(sum(partials), y_ref, atol=TOL, rtol=0)  # the base's all-reduce
    torch.testing.assert_close(in_spec.unshard(dxs), dx_ref, atol=TOL, rtol=0)
    torch.testing.assert_close(a_spec.unshard(das), da_ref, atol=TOL, rtol=0)
    torch.testing.assert_close(sum(dbs), db_ref, atol=TOL, rtol=0)  # finalize_grads


def test_merge_per_shard_equals_dense_merge():
    x, w, a, b, _ = _problem(seed=7, out_f=32)
    s, tp = 0.25, 4
    dense = lf.merged_weight(w, a, b, s)
    a_spec, b_spec = lora_factor_specs("column", 2)
    w_spec = ShardSpec(dim=0, chunks=2)
    shards = [lf.merged_weight(w_spec.shard(w, i, tp), a_spec.shard(a, i, tp), b_spec.shard(b, i, tp), s)
              for i in range(tp)]
    torch.testing.assert_close(w_spec.unshard(shards), dense, atol=TOL, rtol=0)
    torch.testing.assert_close(F.linear(x, dense), _dense(x, w, a, b, s), atol=TOL, rtol=0)
