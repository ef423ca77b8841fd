"""Real gloo ranks (TP 2 and 4), float64: ColumnParallelLoRA / RowParallelLoRA on Megatron's own
ColumnParallelLinear / RowParallelLinear against a dense float64 reference.

Checked on every rank: the output, the input gradient, this rank's gradients of A, B and the
base bias (after finalize_grads), with sequence parallelism off and on, gather_output and
skip_bias_add, and that the adapter adds no collective to the base layer's own.
"""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.harness import counting

TOL = 1e-10
IN_F, OUT_F, R, SEQ, BATCH = 16, 24, 4, 8, 2


class _Host(torch.nn.Module):
    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def _full_problem(mode):
    g = torch.Generator().manual_seed(1234)
    in_f, out_f = (IN_F, OUT_F) if mode == "column" else (OUT_F, IN_F)
    mk = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    return in_f, out_f, mk(out_f, in_f), mk(out_f), mk(SEQ, BATCH, in_f), mk(SEQ, BATCH, out_f)


def _build(mode, tp, sp, gather_output, skip_bias_add, dropout=0.0, use_dora=False):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig

    from parallel_adapters import LoraConfig, get_adapter_model
    from parallel_adapters.distributed.sharding import ShardSpec
    from parallel_adapters.mcore import cpu
    from parallel_adapters.mcore.compat import initialize_model_parallel

    cpu.enable_cpu_mode()  # the dropout streams live in Megatron's RNG tracker, which wants CUDA otherwise
    groups = initialize_model_parallel(tp, 1)
    config = TransformerConfig(num_layers=1, hidden_size=IN_F, num_attention_heads=4, use_cpu_initialization=True,
                               params_dtype=torch.float64, sequence_parallel=sp, gradient_accumulation_fusion=False,
                               tensor_model_parallel_size=tp)
    in_f, out_f, w, bias, x, dy = _full_problem(mode)
    init = torch.nn.init.zeros_
    if mode == "column":
        base = ColumnParallelLinear(in_f, out_f, config=config, init_method=init, bias=True,
                                    gather_output=gather_output, skip_bias_add=skip_bias_add)
    else:
        base = RowParallelLinear(in_f, out_f, config=config, init_method=init, bias=True,
                                 input_is_parallel=True, skip_bias_add=skip_bias_add)
    w_spec = ShardSpec(dim=0 if mode == "column" else 1)  # as Megatron splits W (DoRA's init reads it)
    with torch.no_grad():
        base.weight.copy_(w_spec.shard(w, groups.tp_rank, tp))
        base.bias.copy_(bias if mode == "row" else w_spec.shard(bias.unsqueeze(1), groups.tp_rank, tp).squeeze(1))
    host = _Host(base)
    lora = LoraConfig(r=R, lora_alpha=8, target_modules=["proj"], init_lora_weights=False, bias="all",
                      lora_dropout=dropout, seed=3, use_dora=use_dora)
    model = get_adapter_model(host, lora, groups=groups)
    layer = model.model.proj
    assert w_spec == (layer.spec_b if mode == "column" else layer.spec_a)  # W is split like the split factor
    return model, layer, groups, (w, bias, x, dy)


def _dense_reference(layer, w, bias, x, dy):
    from parallel_adapters.adapters import functional as lf
    from parallel_adapters.config import lora_scaling

    generator = torch.Generator().manual_seed(lf.factor_seed(3, "proj", "default"))
    a, b = lf.init_lora_factors(w.shape[0], w.shape[1], R, False, generator, torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, a, b, bias)]
    xr, ar, br, biasr = leaves
    y = F.linear(xr, w, biasr) + lf.lora_up(lf.lora_down(xr, ar), br, lora_scaling(8, R, False))
    y.backward(dy)
    return y.detach(), xr.grad, ar.grad, br.grad, biasr.grad


def layer_parity_job(mode, tp, sp, gather_output=False, skip_bias_add=False):
    from parallel_adapters.distributed.sharding import ShardSpec

    model, layer, groups, (w, bias, x, dy) = _build(mode, tp, sp, gather_output, skip_bias_add)
    rank = groups.tp_rank
    seq = ShardSpec(dim=0)
    out_split = ShardSpec(dim=2, chunks=layer.geometry.chunks)
    y_ref, dx_ref, da_ref, db_ref, dbias_ref = _dense_reference(layer, w, bias, x, dy)

    if mode == "column":
        x_in = seq.shard(x, rank, tp) if sp else x
        local_out = (lambda t: t) if gather_output else (lambda t: out_split.shard(t, rank, tp))  # noqa: E731
        dx_expect = seq.shard(dx_ref, rank, tp) if sp else dx_ref
    else:
        x_in = ShardSpec(dim=2).shard(x, rank, tp)
        local_out = (lambda t: seq.shard(t, rank, tp)) if sp else (lambda t: t)  # noqa: E731
        dx_expect = ShardSpec(dim=2).shard(dx_ref, rank, tp)
    x_in = x_in.clone().requires_grad_()
    with counting.counted() as fwd_bwd:
        y, out_bias = model(x_in)
        if skip_bias_add:
            y = y + out_bias
        y.backward(local_out(dy))
    with counting.counted() as finalize:
        model.finalize_grads()

    bias_spec = ShardSpec(dim=0) if mode == "column" else ShardSpec()
    split, replicated = ((layer.lora_B, layer.lora_A) if mode == "column" else (layer.lora_A, layer.lora_B))
    split_w, replicated_w = split["default"].weight, replicated["default"].weight
    assert split_w.tensor_model_parallel and split_w.partition_dim == (0 if mode == "column" else 1)
    assert not getattr(replicated_w, "tensor_model_parallel", False)  # clipping counts it once
    errors = {
        "y": (y.detach() - local_out(y_ref)).abs().max().item(),
        "dx": (x_in.grad - dx_expect).abs().max().item(),
        "dA": (layer.lora_A["default"].weight.grad - layer.spec_a.shard(da_ref, rank, tp)).abs().max().item(),
        "dB": (layer.lora_B["default"].weight.grad - layer.spec_b.shard(db_ref, rank, tp)).abs().max().item(),
        "dbias": (layer.bias.grad - bias_spec.shard(dbias_ref, rank, tp)).abs().max().item(),
    }
    return errors, dict(fwd_bwd.calls), dict(finalize.calls)


def _base_collectives(mode, sp, gather_output):
    """What Megatron's own layer issues per forward+backward (one call each)."""
    if mode == "column":
        calls = {"all_gather_into_tensor": 1, "reduce_scatter_tensor": 1} if sp else {"all_reduce": 1}
        if gather_output:
            calls["all_gather_into_tensor"] = calls.get("all_gather_into_tensor", 0) + 1
        return calls
    return {"reduce_scatter_tensor": 1, "all_gather_into_tensor": 1} if sp else {"all_reduce": 1}


CASES = [
    ("column", False, False, False), ("column", True, False, False), ("column", False, True, False),
    ("column", False, False, True), ("column", True, True, False), ("row", False, False, False), ("row", True, False, False),
    ("row", False, False, True), ("row", True, False, True),
]


def _check(results, mode, sp, gather_output):
    for rank, (errors, calls, finalize_calls) in enumerate(results):
        assert max(errors.values()) < TOL, f"rank {rank}: {errors}"
        assert calls == _base_collectives(mode, sp, gather_output), f"rank {rank}: {calls}"
        assert finalize_calls == {"all_reduce": 1}, f"rank {rank}: {finalize_calls}"


@pytest.mark.parametrize("mode,sp,gather_output,skip_bias_add", CASES)
def test_layer_parity_tp2(pool2, mode, sp, gather_output, skip_bias_add):
    _check(pool2.run(layer_parity_job, mode, 2, sp, gather_output, skip_bias_add), mode, sp, gather_output)


@pytest.mark.parametrize("mode,sp", [("column", False), ("column", True), ("row", False), ("row", True)])
def test_layer_parity_tp4(pool4, mode, sp):
    _check(pool4.run(layer_parity_job, mode, 4, sp), mode, sp, False)


def tp1_job(mode):
    errors, calls, finalize_calls = layer_parity_job(mode, 1, False)
    return errors, calls, finalize_calls


@pytest.mark.parametrize("mode", ["column", "row"])
def test_layer_parity_tp1_issues_no_collective(pool2, mode):
    for errors, calls, finalize_calls in pool2.run(tp1_job, mode):
        assert max(errors.values()) < TOL, errors
        assert calls == {} and finalize_calls == {}


def dropout_masks_job():
    """Column input is TP-replicated: every TP rank must draw the same dropout mask."""
    model, layer, groups, (w, bias, x, dy) = _build("column", 2, False, False, False, dropout=0.5)
    model.train()
    z = []
    for _ in range(2):
        z.append(layer._dropout["default"](torch.ones(4, 8, dtype=torch.float64)))
    gathered = [torch.empty_like(z[0]) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, z[0])
    return torch.equal(gathered[0], gathered[1]), torch.equal(z[0], z[1])


def test_replicated_input_dropout_mask_agrees_across_tp(pool2):
    for same_across_ranks, same_across_calls in pool2.run(dropout_masks_job):
        assert same_across_ranks and not same_across_calls
