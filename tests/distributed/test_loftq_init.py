"""Real gloo ranks (TP 2 and 4), float64: LoftQ ("loftq", NF4, loftq_iter 1 and 2) on Megatron's
ColumnParallelLinear / RowParallelLinear, sequence parallelism off and on.

Oracles: the TP=1 result (decompose/loftq.py on the whole W with a group of one, what a TP=1 layer
runs) and a dense float64 reference (PEFT's loop with torch.linalg.svd and our sign convention:
the largest entry of each row of A positive).  Checked on every rank: this rank's A and B shards,
the de-quantised base shard Q_i (bit for bit: the same blocks, see decompose/quantize.py), and the
layer's output at init (Q x + s B A x).  A row-parallel layer whose shard width is not a multiple
of the block is refused on every rank, naming it, before any change.

"No full matrix": every collective's received size recorded; no rank receives more than the
split SVD's bound per SVD run (decompose/svd.py), nor in one collective as much as a weight shard.
"""
import pytest
import torch
import torch.distributed as dist

from tests.distributed.test_decomposition_init import planted
from tests.harness import counting

TOL = 1e-6
R, ALPHA, SEQ, BATCH = 3, 6, 4, 2
SHAPES = {"column": (48, 32), "row": (16, 256)}  # W [O, I]: (O/4) I and I/4 multiples of 64


def dense_loftq(w, r, bits, iters):
    from parallel_adapters.decompose import quantize

    a, b = w.new_zeros(r, w.shape[1]), w.new_zeros(w.shape[0], r)
    for _ in range(iters):
        q = quantize.fake_quantize(w - b @ a, bits)
        u, s, vh = torch.linalg.svd(w - q, full_matrices=False)
        vh = vh[:r]
        signs = torch.sign(vh.gather(1, vh.abs().argmax(dim=1, keepdim=True)))
        a, b = s[:r, None].sqrt() * vh * signs, u[:, :r] * signs.T * s[:r].sqrt()
    return a, b, q


def _weight(out_f, in_f):
    return planted(out_f, in_f) + 0.05 * torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(3),
                                                     dtype=torch.float64)


def init_job(mode, tp, sp, iters):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig

    from parallel_adapters import LoraConfig, get_adapter_model
    from parallel_adapters.adapters import functional as lf
    from parallel_adapters.config import LoftQConfig, lora_scaling
    from parallel_adapters.decompose import loftq
    from parallel_adapters.distributed.groups import GROUP_OF_ONE
    from parallel_adapters.distributed.sharding import ShardSpec
    from parallel_adapters.mcore.compat import initialize_model_parallel
    from tests.distributed.test_lora_layers import _Host

    groups = initialize_model_parallel(tp, 1)
    rank = groups.tp_rank
    config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, use_cpu_initialization=True,
                               params_dtype=torch.float64, sequence_parallel=sp, gradient_accumulation_fusion=False,
                               tensor_model_parallel_size=tp)
    zeros = torch.nn.init.zeros_

    def layer_of(out_f, in_f):
        if mode == "column":
            return ColumnParallelLinear(in_f, out_f, config=config, init_method=zeros, bias=False, gather_output=False)
        return RowParallelLinear(in_f, out_f, config=config, init_method=zeros, bias=False, input_is_parallel=True,
                                 skip_bias_add=False)

    w_spec = ShardSpec(dim=0 if mode == "column" else 1)
    lora = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["proj"], init_lora_weights="loftq", seed=4,
                      loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=iters))
    refused = None
    if mode == "row":  # W [16, 64]: 64 / t columns per shard, a block of 64 would straddle shards
        odd = layer_of(16, 64)
        with torch.no_grad():
            odd.weight.copy_(w_spec.shard(_weight(16, 64), rank, tp))
        before = odd.weight.detach().clone()
        try:
            get_adapter_model(_Host(odd), lora, groups=groups)
        except ValueError as error:
            refused = str(error) if torch.equal(odd.weight, before) else "changed"

    out_f, in_f = SHAPES[mode]
    w = _weight(out_f, in_f)
    base = layer_of(out_f, in_f)
    with torch.no_grad():
        base.weight.copy_(w_spec.shard(w, rank, tp))
    x = torch.randn(SEQ, BATCH, in_f, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    x_in = (ShardSpec(dim=0).shard(x, rank, tp) if sp else x) if mode == "column" else ShardSpec(dim=2).shard(x, rank, tp)
    with counting.counted() as calls:
        model = get_adapter_model(_Host(base), lora, groups=groups)
    layer = model.model.proj
    y_init, _ = model(x_in)

    s = lora_scaling(ALPHA, R, False)
    generator = torch.Generator().manual_seed(lf.factor_seed(4, "proj", "default", "loftq"))
    ref = loftq.loftq_factors(w, mode, R, 4, iters, generator, torch.arange(in_f), GROUP_OF_ONE)
    a_dense, b_dense, q_dense = dense_loftq(w, R, 4, iters)
    y_full = x @ (ref.q + s * ref.b @ ref.a).T
    y_ref = ShardSpec(dim=2).shard(y_full, rank, tp) if mode == "column" else (
        ShardSpec(dim=0).shard(y_full, rank, tp) if sp else y_full)
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    errors = {
        "A": (a - layer.spec_a.shard(ref.a, rank, tp)).abs().max().item(),
        "B": (b - layer.spec_b.shard(ref.b, rank, tp)).abs().max().item(),
        "A_dense": (ref.a - a_dense).abs().max().item(),
        "B_dense": (ref.b - b_dense).abs().max().item(),
        "Q": (layer.weight.detach() - w_spec.shard(ref.q, rank, tp)).abs().max().item(),
        "Q_dense": (ref.q - q_dense).abs().max().item(),
        "y_init": (y_init - y_ref).abs().max().item(),
    }
    exact_q = torch.equal(layer.weight.detach(), w_spec.shard(ref.q, rank, tp))
    moved = (layer.weight.detach() - w_spec.shard(w, rank, tp)).abs().max().item()
    return errors, exact_q, moved, set(calls.calls), refused


def _check(results, mode, iters):
    for rank, (errors, exact_q, moved, calls, refused) in enumerate(results):
        assert max(errors.values()) < TOL, f"rank {rank}: {errors}"
        assert exact_q or iters > 1, f"rank {rank}: Q(W) differs from TP=1's"  # later: W - B A rounds per shard
        assert moved > 1e-3, f"rank {rank}: the base shard was not replaced by Q"
        assert calls <= {"all_reduce", "all_gather_into_tensor"}, f"rank {rank}: {calls}"
        if mode == "row":
            assert refused is not None and "proj" in refused and "[16, 64]" in refused and "block" in refused, refused


@pytest.mark.parametrize("mode,sp,iters", [("column", False, 1), ("column", True, 2), ("row", False, 2),
                                           ("row", True, 1)])
def test_tp2_gives_the_tp1_adapter(pool2, mode, sp, iters):
    _check(pool2.run(init_job, mode, 2, sp, iters), mode, iters)


@pytest.mark.parametrize("mode,sp", [("column", True), ("row", False)])
def test_tp4_gives_the_tp1_adapter(pool4, mode, sp):
    _check(pool4.run(init_job, mode, 4, sp, 2), mode, 2)


def traffic_job(mode, iters):
    from parallel_adapters.decompose import loftq, svd
    from parallel_adapters.distributed.sharding import ShardSpec

    t, rank = dist.get_world_size(), dist.get_rank()
    out_f, in_f = (96, 64) if mode == "column" else (64, 256)
    w = _weight(out_f, in_f)
    w_local = ShardSpec(dim=0 if mode == "column" else 1).shard(w, rank, t).clone()
    in_index = (ShardSpec(dim=0) if mode == "row" else ShardSpec()).shard(torch.arange(in_f), rank, t)
    with counting.received() as records, counting.counted() as calls:
        result = loftq.loftq_factors(w_local, mode, R, 4, iters, torch.Generator().manual_seed(0), in_index, None)
    received = counting.numels(records)
    n, m = (in_f, out_f) if mode == "column" else (out_f, in_f)
    return received, dict(calls.calls), result.iterations, svd.block_size(R, m, n, None), n, w_local.numel()


@pytest.mark.parametrize("mode", ["column", "row"])
def test_no_rank_receives_a_weight_sized_tensor(pool4, mode):
    t, iters = 4, 2
    for rank, (received, calls, iterations, b, n, shard) in enumerate(pool4.run(traffic_job, mode, iters)):
        assert sum(calls.values()) == len(received) and set(calls) <= {"all_reduce", "all_gather_into_tensor"}, calls
        bound = (iterations + iters) * (n * b + t * b * b) + iterations + iters * 3 * t * R  # O((O + I) b) per run
        assert sum(received) <= bound, f"rank {rank}: {sum(received)} > {bound} ({received})"
        assert max(received) < shard, f"rank {rank}: a collective of {max(received)} elements (shard {shard})"
