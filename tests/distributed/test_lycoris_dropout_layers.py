"""Real gloo ranks (TP 1 and 2), float64: LoHa's and LoKr's module and rank dropout (PEFT's
`module_dropout`, `rank_dropout`) on Megatron's ColumnParallelLinear (SP on) / RowParallelLinear in
training, against a dense float64 reference written here from PEFT's rule with the same draws:

    u = the layer's draw for this forward (recorded on each rank): u[0] > module_dropout keeps the
    adapter; keep = u[1:] > rank_dropout over ALL O rows, divided by its mean (LoHa always, LoKr
    with rank_dropout_scale); y = x (W + keep[:, None] * dW)^T + b, or x W^T + b when skipped.

Four training forwards each (some skip the adapter, some drop rows).  Checked on every rank: the
output, the input gradient and each adapter tensor's gradient after finalize_grads; that every
TP rank drew the same u, and TP=1 the same as TP=2 from the same seed (so, with the reference,
both give the same outputs and gradients) while another DP rank draws its own; eval draws nothing.
"""
import pytest
import torch

from tests.distributed.test_ia3_loha_layers import _build

TOL = 1e-10
FORWARDS, RANK_P, MODULE_P = 4, 0.5, 0.5
KINDS = {"loha": True, "lokr": True, "lokr-unscaled": False}  # kind -> the kept rows divided by their mean


def _config(kind):
    from parallel_adapters import LoHaConfig, LoKrConfig

    drop = dict(rank_dropout=RANK_P, module_dropout=MODULE_P, target_modules=["proj"], seed=5)
    if kind == "loha":
        return LoHaConfig(r=3, alpha=6.0, **drop)
    return LoKrConfig(r=1, alpha=3.0, decompose_both=True, rank_dropout_scale=KINDS[kind], **drop)


def _delta(kind, t):
    if kind == "loha":
        return 2.0 * (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
    return 3.0 * torch.kron(t["lokr_w1_a"] @ t["lokr_w1_b"], t["lokr_w2_a"] @ t["lokr_w2_b"])


def _reference(kind, u, x, w, bias, t):
    """PEFT's rule (module docstring) on leaves; None when the adapter sits out."""
    if not u[0] > MODULE_P:
        return x @ w.T + bias
    keep = (u[1:] > RANK_P).to(torch.float64)
    keep = keep / keep.mean() if KINDS[kind] else keep
    return x @ (w + keep[:, None] * _delta(kind, t)).T + bias


def dropout_job(kind, mode, tp):
    from megatron.core import tensor_parallel

    from parallel_adapters.distributed.sharding import ShardSpec
    from parallel_adapters.mcore import cpu

    cpu.enable_cpu_mode()  # the draws come from Megatron's RNG tracker, which wants CUDA otherwise
    tracker = tensor_parallel.get_cuda_rng_tracker()  # a pool worker keeps it between jobs: start the streams afresh
    tracker.set_states({k: v for k, v in tracker.get_states().items() if "-dropout/" not in k})
    sp = mode == "column" and tp > 1
    model, layer, groups, (w, bias, x, dy), full = _build(mode, tp, sp, _config(kind))
    rank, drawn = groups.tp_rank, []
    source = layer._weight_dropout["default"].source
    uniform = source.uniform
    source.uniform = lambda n, device: drawn.append(uniform(n, device)) or drawn[-1]  # record each draw
    seq, in_split = ShardSpec(dim=0), ShardSpec(dim=2)
    if mode == "column":
        x_in, local_out, local_dx = (seq.shard(x, rank, tp) if sp else x), ShardSpec(dim=2), (seq if sp else None)
    else:
        x_in, local_out, local_dx = in_split.shard(x, rank, tp), None, in_split
    shard = lambda spec, t: t if spec is None else spec.shard(t, rank, tp)  # noqa: E731
    model.train()
    errors, skipped = [], 0
    for _ in range(FORWARDS):
        xi = x_in.clone().requires_grad_()
        y, _ = model(xi)
        y.backward(shard(local_out, dy))
        model.finalize_grads()
        leaves = {n: t.clone().requires_grad_() for n, t in full.items()}
        xr = x.clone().requires_grad_()
        y_ref = _reference(kind, drawn[-1], xr, w, bias, leaves)
        y_ref.backward(dy)
        skipped += not drawn[-1][0] > MODULE_P
        err = {"y": (y.detach() - shard(local_out, y_ref.detach())).abs().max().item(),
               "dx": (xi.grad - shard(local_dx, xr.grad)).abs().max().item()}
        tensors = layer.adapter_tensors("default")
        for decl in layer.tensor_decls("default"):
            ours, ref = tensors[decl.name].grad, leaves[decl.name].grad
            ours = torch.zeros_like(tensors[decl.name]) if ours is None else ours
            ref = torch.zeros_like(full[decl.name]) if ref is None else ref
            err["d" + decl.name] = (ours - decl.spec.shard(ref, rank, tp)).abs().max().item()
            tensors[decl.name].grad = None
        errors.append(err)
    model.eval()
    y_eval = model(x_in)[0].detach()
    return errors, torch.stack(drawn), skipped, len(drawn) == FORWARDS, y_eval


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["column", "row"])
def test_dropout_tp2_matches_the_dense_reference_and_tp1(pool2, kind, mode):
    tp1 = pool2.run(dropout_job, kind, mode, 1)
    tp2 = pool2.run(dropout_job, kind, mode, 2)
    for rank, (errors, drawn, skipped, eval_draws_nothing, _) in enumerate(tp1 + tp2):
        assert all(max(e.values()) < TOL for e in errors), f"rank {rank}: {errors}"
        assert eval_draws_nothing
    for rank, (_, drawn, *_) in enumerate(tp2):
        assert torch.equal(drawn, tp1[0][1]), f"TP=2 rank {rank}: other draws than TP=1's"
    assert not torch.equal(tp1[1][1], tp1[0][1])  # at TP=1 the pool's second rank is DP rank 1: its own draws
    assert 0 < tp1[0][2] < FORWARDS, "the case should both skip the adapter and run it"
    drawn = tp1[0][1][:, 1:]
    assert ((drawn > RANK_P).sum(dim=1) < drawn.shape[1]).all()  # rows dropped in every forward
