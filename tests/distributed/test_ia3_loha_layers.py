"""Real gloo ranks (TP 1, 2 and 4), float64: IA3 (`IA3Config`) and LoHa (`LoHaConfig`) on
Megatron's ColumnParallelLinear / RowParallelLinear (with a bias) against dense float64 references
written here from PEFT's formulas:

    IA3, output scaling:  y = (x W^T + b) * l             (PEFT's ia3 Linear, is_feedforward=False)
    IA3, input scaling:   y = (x * l) W^T + b             (is_feedforward=True)
    LoHa:                 y = x (W + s (w1a w1b) * (w2a w2b))^T + b,  s = alpha / r

Every adapter tensor is set from one random full tensor (sharded by its declared spec), so the
scales are not 1 and LoHa's w2b is not 0.  Checked on every rank, SP off and on: the output, the
input gradient and each adapter tensor's gradient after finalize_grads; that the layer issues
exactly the base layer's collectives and finalize_grads at most one all-reduce (exactly one where
a tensor is replicated with a partial gradient); merge / unmerge exact on each shard.
"""
import pytest
import torch

from tests.distributed.layer_parity import kind_parity, local_input
from tests.distributed.test_lora_layers import IN_F, _base_collectives, _full_problem, _Host
from tests.harness import counting

TOL = 1e-10
R, ALPHA = 3, 6.0


def _build(mode, tp, sp, adapter_config):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig

    from parallel_adapters import get_adapter_model
    from parallel_adapters.distributed.sharding import ShardSpec
    from parallel_adapters.mcore.compat import initialize_model_parallel

    groups = initialize_model_parallel(tp, 1)
    config = TransformerConfig(num_layers=1, hidden_size=IN_F, num_attention_heads=4, use_cpu_initialization=True,
                               params_dtype=torch.float64, sequence_parallel=sp, gradient_accumulation_fusion=False,
                               tensor_model_parallel_size=tp)
    in_f, out_f, w, bias, x, dy = _full_problem(mode)
    init = torch.nn.init.zeros_
    if mode == "column":
        base = ColumnParallelLinear(in_f, out_f, config=config, init_method=init, bias=True, gather_output=False)
    else:
        base = RowParallelLinear(in_f, out_f, config=config, init_method=init, bias=True, input_is_parallel=True,
                                 skip_bias_add=False)
    w_spec = ShardSpec(dim=0 if mode == "column" else 1)
    with torch.no_grad():
        base.weight.copy_(w_spec.shard(w, groups.tp_rank, tp))
        base.bias.copy_(bias if mode == "row" else ShardSpec(dim=0).shard(bias, groups.tp_rank, tp))
    model = get_adapter_model(_Host(base), adapter_config, groups=groups)
    layer = model.model.proj
    full = {}  # every tensor from one random full tensor, this rank keeping its shard
    g = torch.Generator().manual_seed(99)
    for decl in layer.tensor_decls("default"):
        full[decl.name] = 1 + 0.5 * torch.randn(decl.global_shape, generator=g, dtype=torch.float64)
        with torch.no_grad():
            layer.adapter_tensors("default")[decl.name].copy_(decl.spec.shard(full[decl.name], groups.tp_rank, tp))
    return model, layer, groups, (w, bias, x, dy), full


def _config(variant):
    from parallel_adapters import IA3Config, LoHaConfig

    if variant == "loha":
        return LoHaConfig(r=R, alpha=ALPHA, target_modules=["proj"], seed=5)
    return IA3Config(target_modules=["proj"], feedforward_modules=["proj"] if variant == "ia3-input" else [])


def reference(variant, x, w, bias, t):
    """The dense formula on leaves (module docstring)."""
    if variant == "ia3-output":
        return (x @ w.T + bias) * t["ia3_l"].flatten()
    if variant == "ia3-input":
        return (x * t["ia3_l"].flatten()) @ w.T + bias
    delta = (ALPHA / R) * (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
    return x @ (w + delta).T + bias


def parity_job(variant, mode, tp, sp):
    model, layer, groups, (w, bias, x, dy), full = _build(mode, tp, sp, _config(variant))
    errors, calls, finalize = kind_parity(model, layer, x, dy, full, lambda xr, t: reference(variant, xr, w, bias, t),
                                          mode, groups.tp_rank, tp, sp)
    partial = any(True for _ in layer.partial_grad_parameters())
    return errors, calls, finalize, partial


def _check(results, mode, sp, tp):
    for rank, (errors, calls, finalize_calls, partial) in enumerate(results):
        assert max(errors.values()) < TOL, f"rank {rank}: {errors}"
        assert calls == (_base_collectives(mode, sp, False) if tp > 1 else {}), f"rank {rank}: {calls}"
        assert finalize_calls == ({"all_reduce": 1} if tp > 1 and partial else {}), f"rank {rank}: {finalize_calls}"


MODES = [("column", False), ("column", True), ("row", False), ("row", True)]
VARIANTS = ["ia3-output", "ia3-input", "loha"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode,sp", MODES)
def test_parity_tp2(pool2, variant, mode, sp):
    _check(pool2.run(parity_job, variant, mode, 2, sp), mode, sp, 2)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode,sp", MODES)
def test_parity_tp4(pool4, variant, mode, sp):
    _check(pool4.run(parity_job, variant, mode, 4, sp), mode, sp, 4)


def tp1_job(variant, mode):
    return parity_job(variant, mode, 1, False)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", ["column", "row"])
def test_parity_tp1_issues_no_collective(pool2, variant, mode):
    _check(pool2.run(tp1_job, variant, mode), mode, False, 1)


def test_partial_gradients_are_the_replicated_tensors(pool2):
    """Which tensors finalize_grads sums: those replicated over TP whose gradient is partial."""
    expected = {("ia3-output", "column", False): set(), ("ia3-output", "row", False): set(),
                ("ia3-output", "row", True): {"ia3_l"}, ("ia3-input", "column", False): {"ia3_l"},
                ("ia3-input", "row", True): set(), ("loha", "column", True): {"hada_w1_b", "hada_w2_b"},
                ("loha", "row", False): {"hada_w1_a", "hada_w2_a"}}
    for (variant, mode, sp), names in expected.items():
        for got in pool2.run(partial_names_job, variant, mode, sp):
            assert got == names, (variant, mode, sp, got)


def partial_names_job(variant, mode, sp):
    _, layer, _, _, _ = _build(mode, 2, sp, _config(variant))
    ids = {id(p) for p in layer.partial_grad_parameters()}
    return {n for n, p in layer.adapter_tensors("default").items() if id(p) in ids}


def merge_job(variant, mode, tp, sp):
    """PEFT's merge rule on each shard: W * l (rows or columns) and b * l for output scaling;
    W + dW for LoHa.  The merged layer gives the same output; unmerge restores W and b exactly."""
    from parallel_adapters.distributed.sharding import ShardSpec

    model, layer, groups, (w, bias, x, _), full = _build(mode, tp, sp, _config(variant))
    model.eval()
    rank = groups.tp_rank
    w_spec = ShardSpec(dim=0 if mode == "column" else 1)
    b_spec = ShardSpec(dim=0) if mode == "column" else ShardSpec()
    if variant == "ia3-output":
        w_exp, b_exp = w * full["ia3_l"], bias * full["ia3_l"].flatten()
    elif variant == "ia3-input":
        w_exp, b_exp = w * full["ia3_l"], bias
    else:
        t = full
        w_exp = w + (ALPHA / R) * (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
        b_exp = bias
    x_in = local_input(x, mode, rank, tp, sp)
    before = model(x_in)[0].detach()
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    with counting.counted() as merge_calls:
        model.merge_adapter()
    errors = {"W": (layer.weight - w_spec.shard(w_exp, rank, tp)).abs().max().item(),
              "b": (layer.bias - b_spec.shard(b_exp, rank, tp)).abs().max().item(),
              "y": (model(x_in)[0] - before).abs().max().item()}
    model.unmerge_adapter()
    exact = torch.equal(layer.weight, w0) and torch.equal(layer.bias, b0)
    return errors, exact, dict(merge_calls.calls)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode,sp", [("column", True), ("row", False)])
def test_merge_unmerge_tp2(pool2, variant, mode, sp):
    for errors, exact, calls in pool2.run(merge_job, variant, mode, 2, sp):
        assert max(errors.values()) < TOL and exact, errors
        assert calls == {}, calls  # every shard merges alone
