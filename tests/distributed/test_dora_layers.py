"""Real gloo ranks (TP 1, 2 and 4), float64: DoRA (`LoraConfig(use_dora=True)`) on Megatron's
ColumnParallelLinear / RowParallelLinear against a dense float64 reference written here from the
DoRA formula (PEFT's DoraLinearLayer):

    y = m / ||W + s B A||_row * (x W^T + s x A^T B^T) + b                  (eval / dropout 0)
    y = x W^T + b + (f - 1) drop(x) W^T + f s drop(x) A^T B^T, f = m / ||W + s B A||   (dropping)

the norm detached.  Checked on every rank: the magnitude's initial value (the row norms of
W + s B A), the output, the input gradient, this rank's gradients of A, B, the magnitude and the
bias after finalize_grads, with sequence parallelism off and on; and that the layer issues exactly
the base layer's collectives (the row norms ride inside the row layer's one reduction) and
finalize_grads one all-reduce.  With dropout, each rank's mask is the matching slice of one full
mask (set on the layer), so the reference sees one dropped input.
"""
import pytest
import torch

from tests.distributed.layer_parity import local_input, sharded_step
from tests.distributed.test_lora_layers import R, _base_collectives, _build
from tests.harness import counting

TOL = 1e-10
P_DROP = 0.3


def dora_reference(x, w, bias, a, b, s, m, dropped=None):
    """Unsharded DoRA on leaves; returns y."""
    f = m / torch.linalg.norm(w + s * (b @ a), dim=1).detach()
    if dropped is None:
        return f * (x @ w.T + s * (x @ a.T) @ b.T) + bias
    return x @ w.T + bias + (f - 1) * (dropped @ w.T) + f * s * ((dropped @ a.T) @ b.T)


def _full_mask(shape):
    g = torch.Generator().manual_seed(77)
    return (torch.rand(*shape, generator=g, dtype=torch.float64) >= P_DROP).to(torch.float64) / (1 - P_DROP)


def dora_parity_job(mode, tp, sp, dropout=False):
    from parallel_adapters.adapters import functional as lf
    from parallel_adapters.adapters.kinds.dora import MAGNITUDE
    from parallel_adapters.config import lora_scaling
    from parallel_adapters.distributed.sharding import ShardSpec

    model, layer, groups, (w, bias, x, dy) = _build(mode, tp, sp, False, False, dropout=P_DROP if dropout else 0.0,
                                                    use_dora=True)
    rank, s = groups.tp_rank, lora_scaling(8, R, False)
    generator = torch.Generator().manual_seed(lf.factor_seed(3, "proj", "default"))
    a, b = lf.init_lora_factors(w.shape[0], w.shape[1], R, False, generator, torch.float64)
    m_spec = layer.tensor_decls("default")[2].spec
    magnitude = layer.adapter_tensors("default")[MAGNITUDE]
    init_error = (magnitude.detach() - m_spec.shard(torch.linalg.norm(w + s * b @ a, dim=1), rank, tp)).abs().max()
    m = torch.linalg.norm(w + s * b @ a, dim=1) * (1 + 0.5 * torch.rand(w.shape[0], generator=generator,
                                                                        dtype=torch.float64))
    with torch.no_grad():
        magnitude.copy_(m_spec.shard(m, rank, tp))

    mask = _full_mask(x.shape) if dropout else None
    if dropout:  # this rank's slice of the one mask: its input's sequence (column SP) or feature (row) slice
        local_mask = local_input(mask, mode, rank, tp, sp)
        layer._dropout["default"] = lambda t: t * local_mask
        model.train()
    else:
        model.eval()
    leaves = [t.clone().requires_grad_() for t in (x, a, b, m, bias)]
    xr, ar, br, mr, biasr = leaves
    y_ref = dora_reference(xr, w, biasr, ar, br, s, mr, xr * mask if dropout else None)
    y_ref.backward(dy)

    errors, calls, finalize = sharded_step(model, x, dy, y_ref, xr.grad, mode, rank, tp, sp)

    bias_spec = ShardSpec(dim=0) if mode == "column" else ShardSpec()
    tensors = layer.adapter_tensors("default")
    errors |= {
        "m_init": init_error.item(),
        "dA": (tensors["lora_A"].grad - layer.spec_a.shard(ar.grad, rank, tp)).abs().max().item(),
        "dB": (tensors["lora_B"].grad - layer.spec_b.shard(br.grad, rank, tp)).abs().max().item(),
        "dm": (tensors[MAGNITUDE].grad - m_spec.shard(mr.grad, rank, tp)).abs().max().item(),
        "dbias": (layer.bias.grad - bias_spec.shard(biasr.grad, rank, tp)).abs().max().item(),
    }
    return errors, calls, finalize


def _check(results, mode, sp, tp):
    for rank, (errors, calls, finalize_calls) in enumerate(results):
        assert max(errors.values()) < TOL, f"rank {rank}: {errors}"
        assert calls == (_base_collectives(mode, sp, False) if tp > 1 else {}), f"rank {rank}: {calls}"
        assert finalize_calls == ({"all_reduce": 1} if tp > 1 else {}), f"rank {rank}: {finalize_calls}"


MODES = [("column", False), ("column", True), ("row", False), ("row", True)]


@pytest.mark.parametrize("dropout", [False, True], ids=["eval", "dropout"])
@pytest.mark.parametrize("mode,sp", MODES)
def test_dora_layer_parity_tp2(pool2, mode, sp, dropout):
    _check(pool2.run(dora_parity_job, mode, 2, sp, dropout), mode, sp, 2)


@pytest.mark.parametrize("mode,sp", MODES)
def test_dora_layer_parity_tp4(pool4, mode, sp):
    _check(pool4.run(dora_parity_job, mode, 4, sp, sp), mode, sp, 4)  # dropout with SP, eval without


def tp1_job(mode, dropout):
    return dora_parity_job(mode, 1, False, dropout)


@pytest.mark.parametrize("mode", ["column", "row"])
def test_dora_layer_parity_tp1_issues_no_collective(pool2, mode):
    _check(pool2.run(tp1_job, mode, True), mode, False, 1)


def dora_merge_job(mode, tp, sp):
    """PEFT's merge rule W' = f (W + s B A) per shard (a row layer sums its norms once, here),
    the same output merged, an exact unmerge, and merge_and_unload."""
    from parallel_adapters.adapters.kinds.dora import MAGNITUDE
    from parallel_adapters.config import lora_scaling
    from parallel_adapters.distributed import collectives
    from parallel_adapters.distributed.sharding import ShardSpec

    model, layer, groups, (w, bias, x, _) = _build(mode, tp, sp, False, False, use_dora=True)
    model.eval()
    rank, s = groups.tp_rank, lora_scaling(8, R, False)
    t = {n: p.detach().clone() for n, p in layer.adapter_tensors("default").items()}
    full = {d.name: decl_full for d in layer.tensor_decls("default")  # the whole tensors, for the expectation
            for decl_full in [d.spec.unshard(collectives.all_gather_tensor(t[d.name], groups.tp_group))]}
    with torch.no_grad():
        layer.adapter_tensors("default")[MAGNITUDE].mul_(1.5)
    m = full[MAGNITUDE] * 1.5
    delta = s * full["lora_B"] @ full["lora_A"]
    expected = (m / torch.linalg.norm(w + delta, dim=1)).unsqueeze(1) * (w + delta)
    w_spec = ShardSpec(dim=0 if mode == "column" else 1)
    seq = ShardSpec(dim=0)
    x_in = (seq.shard(x, rank, tp) if sp else x) if mode == "column" else ShardSpec(dim=2).shard(x, rank, tp)
    before = model(x_in)[0].detach()
    w0 = layer.weight.detach().clone()
    with counting.counted() as merge_calls:
        model.merge_adapter()
    errors = {"merged": (layer.weight - w_spec.shard(expected, rank, tp)).abs().max().item(),
              "y": (model(x_in)[0] - before).abs().max().item()}
    model.unmerge_adapter()
    exact = torch.equal(layer.weight, w0)
    plain = model.merge_and_unload()
    errors["unloaded"] = (plain.proj.weight - w_spec.shard(expected, rank, tp)).abs().max().item()
    assert type(plain.proj).__name__ in ("ColumnParallelLinear", "RowParallelLinear")
    return errors, exact, dict(merge_calls.calls)


@pytest.mark.parametrize("mode,sp", [("column", False), ("row", False), ("row", True)])
def test_dora_merge_unmerge_tp2(pool2, mode, sp):
    for errors, exact, calls in pool2.run(dora_merge_job, mode, 2, sp):
        assert max(errors.values()) < TOL and exact, errors
        assert calls == ({"all_reduce": 1} if mode == "row" else {}), calls  # the row norms, once per merge
