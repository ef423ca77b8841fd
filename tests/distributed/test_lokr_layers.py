"""Real gloo ranks (TP 1, 2 and 4), float64: LoKr (`LoKrConfig`) on Megatron's ColumnParallelLinear /
RowParallelLinear (with a bias) against a dense float64 reference written here from PEFT's formula

    y = x (W + s (w1 kron w2))^T + b,  s = alpha / r,  w1 = w1_a w1_b / w2 = w2_a w2_b where a product

Two layouts: both factors whole (r = 8) and both rank-1 products (`decompose_both`).  The column
layer is [24, 16] = (4x6) x (4x4), the row layer [16, 24] = (4x4) x (4x6): w1 splits over TP 2 and
4.  Every tensor is set from one random full tensor (so w1 is not 0).  Checked on every rank, SP
off and on: the output, the input gradient and each adapter tensor's gradient after
finalize_grads; that the layer issues exactly the base layer's collectives and finalize_grads at
most one all-reduce; merge / unmerge exact on each shard; a TP size that does not split w1 is
refused, naming the sizes that do.
"""
import pytest
import torch

from tests.distributed.layer_parity import kind_parity, local_input
from tests.distributed.test_ia3_loha_layers import _build
from tests.distributed.test_lora_layers import _base_collectives
from tests.harness import counting

TOL = 1e-10
LAYOUTS = {"whole": dict(r=8, alpha=6.0), "products": dict(r=1, alpha=3.0, decompose_both=True)}
EXPECTED = {"whole": {"lokr_w1", "lokr_w2"}, "products": {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}}


def _config(layout, **extra):
    from parallel_adapters import LoKrConfig

    return LoKrConfig(target_modules=["proj"], seed=5, **LAYOUTS[layout], **extra)


def reference(layout, x, w, bias, t):
    """The dense formula on leaves (module docstring)."""
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
    kw = LAYOUTS[layout]
    return x @ (w + kw["alpha"] / kw["r"] * torch.kron(w1, w2)).T + bias


def parity_job(layout, mode, tp, sp):
    model, layer, groups, (w, bias, x, dy), full = _build(mode, tp, sp, _config(layout))
    assert set(full) == EXPECTED[layout], sorted(full)
    errors, calls, finalize = kind_parity(model, layer, x, dy, full, lambda xr, t: reference(layout, xr, w, bias, t),
                                          mode, groups.tp_rank, tp, sp)
    split = {decl.name for decl in layer.tensor_decls("default") if not decl.spec.replicated}
    return errors, calls, finalize, split


def _check(results, layout, mode, sp, tp):
    w1_split = {"whole": {"lokr_w1"}, "products": {"lokr_w1_a" if mode == "column" else "lokr_w1_b"}}[layout]
    for rank, (errors, calls, finalize_calls, split) in enumerate(results):
        assert max(errors.values()) < TOL, f"rank {rank}: {errors}"
        assert calls == (_base_collectives(mode, sp, False) if tp > 1 else {}), f"rank {rank}: {calls}"
        assert finalize_calls == ({"all_reduce": 1} if tp > 1 else {}), f"rank {rank}: {finalize_calls}"
        assert split == w1_split, split  # only w1's side is split; w2 is whole on every rank


MODES = [("column", False), ("column", True), ("row", False), ("row", True)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode,sp", MODES)
def test_parity_tp2(pool2, layout, mode, sp):
    _check(pool2.run(parity_job, layout, mode, 2, sp), layout, mode, sp, 2)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode,sp", MODES)
def test_parity_tp4(pool4, layout, mode, sp):
    _check(pool4.run(parity_job, layout, mode, 4, sp), layout, mode, sp, 4)


def tp1_job(layout, mode):
    return parity_job(layout, mode, 1, False)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", ["column", "row"])
def test_parity_tp1_issues_no_collective(pool2, layout, mode):
    for errors, calls, finalize_calls, _ in pool2.run(tp1_job, layout, mode):
        assert max(errors.values()) < TOL and calls == {} and finalize_calls == {}, (errors, calls)


def merge_job(layout, mode, tp, sp):
    """W + dW on each shard; the merged layer gives the same output; unmerge restores W exactly."""
    from parallel_adapters.distributed.sharding import ShardSpec

    model, layer, groups, (w, bias, x, _), full = _build(mode, tp, sp, _config(layout))
    model.eval()
    rank = groups.tp_rank
    w_exp = reference(layout, torch.eye(w.shape[1], dtype=w.dtype), w, torch.zeros(()), full).T
    x_in = local_input(x, mode, rank, tp, sp)
    before = model(x_in)[0].detach()
    w0 = layer.weight.detach().clone()
    with counting.counted() as merge_calls:
        model.merge_adapter()
    errors = {"W": (layer.weight - ShardSpec(dim=0 if mode == "column" else 1).shard(w_exp, rank, tp)).abs().max().item(),
              "y": (model(x_in)[0] - before).abs().max().item()}
    model.unmerge_adapter()
    return errors, torch.equal(layer.weight, w0), dict(merge_calls.calls)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode,sp", [("column", True), ("row", False)])
def test_merge_unmerge_tp2(pool2, layout, mode, sp):
    for errors, exact, calls in pool2.run(merge_job, layout, mode, 2, sp):
        assert max(errors.values()) < TOL and exact, errors
        assert calls == {}, calls


def refusal_job(mode):
    """decompose_factor=3: the column layer's 24 rows are 3x8 and the row layer's 24 columns 3x8,
    so w1's 3 rows (columns) do not split over TP=2."""
    try:
        _build(mode, 2, False, _config("whole", decompose_factor=3))
    except ValueError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("mode", ["column", "row"])
def test_unsplittable_factorisation_is_refused_naming_sizes_that_work(pool2, mode):
    side = "rows" if mode == "column" else "columns"
    shape = "[24, 16]" if mode == "column" else "[16, 24]"
    for message in pool2.run(refusal_job, mode):
        assert message is not None
        for part in ("module proj", shape, "TP=2", f"w1's 3 {side}", "TP sizes [1, 3]", "decompose_factor=3"):
            assert part in message, (part, message)
