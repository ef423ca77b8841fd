"""Real gloo ranks (TP 2 and 4), float64: PiSSA ("pissa", "pissa_niter_2") and OLoRA ("olora") on
Megatron's ColumnParallelLinear / RowParallelLinear, sequence parallelism off and on.

Oracles: the TP=1 result (the same pure functions on the whole W with a group of one, which is
what a TP=1 layer runs) for every method, and a dense float64 SVD / QR of W with our sign
convention for the exact ones.  Checked on every rank: this rank's A and B shards, the residual
base shard W_i - s (B A)_i, and that the layer's output at init is the base's (W_res + s B A = W).

"No full matrix": with every collective's received size recorded, no rank receives more than the
bound each method's docstring states per layer (decompose/svd.py, pissa.py, olora.py), no single
collective carries as many elements as a weight shard, and nothing but all-reduce and all-gather
is issued.
"""
import pytest
import torch
import torch.distributed as dist

from tests.harness import counting

TOL = 1e-6
R, ALPHA, SEQ, BATCH = 3, 6, 8, 2
SHAPES = {"column": (48, 32), "row": (32, 48)}  # W [O, I]


def planted(out_f, in_f, seed=5):
    """U diag(S) V^T in float64, S = 8, 6, 4 then a tail below 0.1 (a clear gap after r = 3)."""
    g = torch.Generator().manual_seed(seed)
    k = min(out_f, in_f)
    u = torch.linalg.qr(torch.randn(out_f, k, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(in_f, k, generator=g, dtype=torch.float64)).Q
    s = torch.cat([torch.tensor([8.0, 6.0, 4.0], dtype=torch.float64), 0.1 * 0.9 ** torch.arange(k - 3.0)])
    return (u * s.to(torch.float64)) @ v.T


def dense_pissa(w, r, s):
    """PEFT's PiSSA on the whole W with our signs: the largest entry of each row of A positive."""
    v, sv, uh = torch.linalg.svd(w, full_matrices=False)
    uh = uh[:r]
    signs = torch.sign(uh.gather(1, uh.abs().argmax(dim=1, keepdim=True)))
    root = (sv[:r] / s).sqrt()
    return root[:, None] * uh * signs, v[:, :r] * signs.T * root


def dense_olora(w, r):
    """PEFT's OLoRA on the whole W with our signs: diag(R) >= 0."""
    q, rr = torch.linalg.qr(w)
    d = torch.sign(torch.diagonal(rr))
    return (rr * d[:, None])[:r], (q * d)[:, :r]


def tp_linear(mode, out_f, in_f, tp, sp=False):
    """Megatron's ColumnParallelLinear ("column") or RowParallelLinear ("row") of W [out_f, in_f] at
    TP `tp`: float64, no bias, the weight zero (a job copies its shard in)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=in_f, num_attention_heads=4, use_cpu_initialization=True,
                               params_dtype=torch.float64, sequence_parallel=sp, gradient_accumulation_fusion=False,
                               tensor_model_parallel_size=tp)
    zeros = torch.nn.init.zeros_
    if mode == "column":
        return ColumnParallelLinear(in_f, out_f, config=config, init_method=zeros, bias=False, gather_output=False)
    return RowParallelLinear(in_f, out_f, config=config, init_method=zeros, bias=False, input_is_parallel=True,
                             skip_bias_add=False)


def planted_tp_linear(mode, out_f, in_f, tp, sp, rank):
    """(tp_linear holding this rank's shard of planted(out_f, in_f), that W, its ShardSpec)."""
    from parallel_adapters.distributed.sharding import ShardSpec

    w = planted(out_f, in_f)
    base = tp_linear(mode, out_f, in_f, tp, sp)
    w_spec = ShardSpec(dim=0 if mode == "column" else 1)
    with torch.no_grad():
        base.weight.copy_(w_spec.shard(w, rank, tp))
    return base, w, w_spec


def init_job(mode, tp, sp, init):
    from parallel_adapters import LoraConfig, get_adapter_model
    from parallel_adapters.adapters import functional as lf
    from parallel_adapters.config import decomposition_init, lora_scaling
    from parallel_adapters.decompose import olora, pissa
    from parallel_adapters.distributed.groups import GROUP_OF_ONE
    from parallel_adapters.distributed.sharding import ShardSpec
    from parallel_adapters.mcore.compat import initialize_model_parallel
    from tests.distributed.test_lora_layers import _Host

    groups = initialize_model_parallel(tp, 1)
    rank = groups.tp_rank
    out_f, in_f = SHAPES[mode]
    base, w, w_spec = planted_tp_linear(mode, out_f, in_f, tp, sp, rank)
    x = torch.randn(SEQ, BATCH, in_f, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    x_in = (ShardSpec(dim=0).shard(x, rank, tp) if sp else x) if mode == "column" else ShardSpec(dim=2).shard(x, rank, tp)
    y_full = x @ w.T  # the base's output before init
    y_base = ShardSpec(dim=2).shard(y_full, rank, tp) if mode == "column" else (
        ShardSpec(dim=0).shard(y_full, rank, tp) if sp else y_full)

    lora = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["proj"], init_lora_weights=init, seed=4)
    with counting.counted() as calls:
        model = get_adapter_model(_Host(base), lora, groups=groups)
    layer = model.model.proj
    y_init, _ = model(x_in)

    s = lora_scaling(ALPHA, R, False)
    name, niter = decomposition_init(init)
    if name == "olora":
        a_ref, b_ref = olora.olora_factors(w, mode, R, torch.arange(in_f), GROUP_OF_ONE)
        dense = dense_olora(w, R)
    else:
        generator = torch.Generator().manual_seed(lf.factor_seed(4, "proj", "default", "pissa"))
        a_ref, b_ref, _ = pissa.pissa_factors(w, mode, R, s, niter, generator, torch.arange(in_f), GROUP_OF_ONE)
        dense = dense_pissa(w, R, s) if niter is None else (a_ref, b_ref)
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    errors = {
        "A": (a - layer.spec_a.shard(a_ref, rank, tp)).abs().max().item(),
        "B": (b - layer.spec_b.shard(b_ref, rank, tp)).abs().max().item(),
        "A_dense": (a_ref - dense[0]).abs().max().item(),
        "B_dense": (b_ref - dense[1]).abs().max().item(),
        "residual": (layer.weight.detach() - w_spec.shard(w - s * b_ref @ a_ref, rank, tp)).abs().max().item(),
        "y_init": (y_init - y_base).abs().max().item(),
    }
    moved = (layer.weight.detach() - w_spec.shard(w, rank, tp)).abs().max().item()
    return errors, moved, set(calls.calls)


INITS = ["pissa", "pissa_niter_2", "olora"]


def _check(results):
    for rank, (errors, moved, calls) in enumerate(results):
        assert max(errors.values()) < TOL, f"rank {rank}: {errors}"
        assert moved > 0.3, f"rank {rank}: the base shard was not replaced by the residual"
        assert calls <= {"all_reduce", "all_gather_into_tensor"}, f"rank {rank}: {calls}"


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("mode,sp", [("column", False), ("column", True), ("row", False), ("row", True)])
def test_tp2_gives_the_tp1_adapter(pool2, mode, sp, init):
    _check(pool2.run(init_job, mode, 2, sp, init))


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("mode,sp", [("column", True), ("row", False)])
def test_tp4_gives_the_tp1_adapter(pool4, mode, sp, init):
    _check(pool4.run(init_job, mode, 4, sp, init))


# -- no full matrix -------------------------------------------------------------------------------

def traffic_job(mode, init):
    """Per collective: the elements this rank receives (all-reduce: the tensor; all-gather: the output)."""
    from parallel_adapters.adapters import functional as lf
    from parallel_adapters.config import decomposition_init
    from parallel_adapters.decompose import olora, pissa, svd
    from parallel_adapters.distributed.sharding import ShardSpec

    t, rank = dist.get_world_size(), dist.get_rank()
    out_f, in_f = 96, 64
    w = planted(out_f, in_f)
    spec = ShardSpec(dim=0 if mode == "column" else 1)
    w_local = spec.shard(w, rank, t).clone()
    in_index = (ShardSpec(dim=0) if mode == "row" else ShardSpec()).shard(torch.arange(in_f), rank, t)
    with counting.received() as records, counting.counted() as calls:
        name, niter = decomposition_init(init)
        if name == "olora":
            olora.olora_factors(w_local, mode, R, in_index, None)
            iterations, b = 0, R
        else:
            generator = torch.Generator().manual_seed(lf.factor_seed(0, "x"))
            _, _, report = pissa.pissa_factors(w_local, mode, R, 2.0, niter, generator, in_index, None)
            iterations, b = report.iterations, svd.block_size(R, in_f if mode == "row" else out_f,
                                                               out_f if mode == "row" else in_f, niter)
    received = counting.numels(records)
    return received, dict(calls.calls), iterations, b, w_local.numel()


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("mode", ["column", "row"])
def test_no_rank_receives_a_weight_sized_tensor(pool4, mode, init):
    t = 4
    n = 64 if mode == "column" else 96  # the unsplit dimension of M (I for column hosts, O for row hosts)
    for rank, (received, calls, iterations, b, shard) in enumerate(pool4.run(traffic_job, mode, init)):
        assert sum(calls.values()) == len(received) and set(calls) <= {"all_reduce", "all_gather_into_tensor"}, calls
        if init == "olora":
            bound = t * R * R + R * 64 if mode == "column" else 96 * R
        else:
            bound = (iterations + 1) * (n * b + t * b * b) + iterations + 3 * t * R
        assert sum(received) <= bound, f"rank {rank}: {sum(received)} > {bound} ({received})"
        assert max(received) < shard, f"rank {rank}: a collective of {max(received)} elements (shard {shard})"
        if init == "pissa_niter_2":
            assert iterations == 2
