"""Real gloo ranks (TP 2 and 4), float64: `add_weighted_adapter` on Megatron's ColumnParallelLinear /
RowParallelLinear, every combination_type it supports.

Oracle: the TP=1 result, i.e. the same call on a plain nn.Linear holding the consolidated source
factors (adapters/weighted.py with a group of one).  Checked: the consolidated new factors and the
update s B A equal TP=1's within 1e-6 (the signs of svd pairs and DARE's masks do not depend on the
TP size; the "_svd" variants' iterative SVD converges to within that), and the new adapter's scale.

"No full update": with every all-reduce / all-gather's received size recorded, no collective
during `add_weighted_adapter` carries an [O, I]-sized tensor; none carries as many elements as a
weight shard, except the "_svd" variants' sketches (n b and t b^2, split_svd's bound), and
nothing but all-reduce and all-gather is issued; linear, cat, dare_linear and dare_ties issue
nothing at all; the exact "svd" route receives at most t R^2 + 3 t k elements per rank (plus the
split new factor with svd_clamp), decompose/lowrank.py's bound.
"""
import pytest
import torch

from tests.distributed.test_decomposition_init import tp_linear
from tests.harness import counting

TOL = 1e-6
SHAPES = {"column": (48, 32), "row": (32, 48)}  # W [O, I]
WEIGHTS = [0.6, -1.4]
CASES = [
    ("linear", {}), ("cat", {}), ("svd", {}), ("svd", {"svd_rank": 5, "svd_clamp": 0.9}),
    ("ties", {"density": 0.4}), ("magnitude_prune", {"density": 0.3}),
    ("dare_linear", {"density": 0.5}), ("dare_ties", {"density": 0.5, "majority_sign_method": "frequency"}),
    ("magnitude_prune_svd", {"density": 0.5}), ("ties_svd", {"density": 0.4, "svd_clamp": 0.9}),
    ("dare_linear_svd", {"density": 0.5}), ("dare_ties_svd", {"density": 0.6}),
]
SILENT = ("linear", "cat", "dare_linear", "dare_ties")


def _configs(combination_type):
    from parallel_adapters import LoraConfig
    r2, alpha2 = (4, 12) if combination_type in ("linear", "ties", "magnitude_prune", "dare_linear", "dare_ties") else (3, 9)
    one = LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], init_lora_weights=False, seed=3)
    return one, one.replace(r=r2, lora_alpha=alpha2, seed=7)


def weighted_job(mode, tp, combination_type, kw):
    from parallel_adapters import get_adapter_model
    from parallel_adapters.mcore.compat import initialize_model_parallel
    from tests.distributed.test_lora_layers import _Host

    groups = initialize_model_parallel(tp, 1)
    out_f, in_f = SHAPES[mode]
    base = tp_linear(mode, out_f, in_f, tp)
    one, two = _configs(combination_type)
    model = get_adapter_model(_Host(base), one, "one", groups=groups)
    model.add_adapter("two", two)
    layer = model.model.proj
    with counting.received() as records, counting.counted() as calls:
        model.add_weighted_adapter(["one", "two"], WEIGHTS, "mix", combination_type=combination_type, **kw)
    received = counting.numels(records)
    shards = {f"{t}.{n}": getattr(layer, t)[n].weight.detach().clone()
              for t in ("lora_A", "lora_B") for n in ("one", "two", "mix")}
    return shards, layer.scaling["mix"], received, dict(calls.calls), layer.weight.numel()


def _consolidate(results, mode):
    """Whole tensors from every rank's shards: B's rows split on a column host, A's columns on a row host."""
    out = {}
    for key in results[0][0]:
        split = (key.startswith("lora_B") and mode == "column") or (key.startswith("lora_A") and mode == "row")
        parts = [r[0][key] for r in results]
        out[key] = torch.cat(parts, dim=0 if mode == "column" else 1) if split else parts[0]
    return out


def _tp1(mode, full, combination_type, kw):
    from parallel_adapters import ParallelGroups, get_adapter_model
    from tests.distributed.test_lora_layers import _Host

    out_f, in_f = SHAPES[mode]
    one, two = _configs(combination_type)
    model = get_adapter_model(_Host(torch.nn.Linear(in_f, out_f, bias=False, dtype=torch.float64)), one, "one",
                              groups=ParallelGroups.single())
    model.add_adapter("two", two)
    layer = model.model.proj
    with torch.no_grad():
        for key in ("lora_A.one", "lora_B.one", "lora_A.two", "lora_B.two"):
            t, n = key.split(".")
            getattr(layer, t)[n].weight.copy_(full[key])
    model.add_weighted_adapter(["one", "two"], WEIGHTS, "mix", combination_type=combination_type, **kw)
    return layer.lora_A["mix"].weight.detach(), layer.lora_B["mix"].weight.detach(), layer.scaling["mix"]


def _check(results, mode, combination_type, kw):
    full = _consolidate(results, mode)
    a_ref, b_ref, s_ref = _tp1(mode, full, combination_type, kw)
    a, b = full["lora_A.mix"], full["lora_B.mix"]
    assert a.shape == a_ref.shape and b.shape == b_ref.shape
    assert (a - a_ref).abs().max() < TOL and (b - b_ref).abs().max() < TOL, combination_type
    assert (s_ref * (b @ a - b_ref @ a_ref)).abs().max() < TOL
    assert b_ref.abs().max() > 0.01
    for rank, (_, scaling, received, calls, shard) in enumerate(results):
        assert scaling == s_ref
        assert set(calls) <= {"all_reduce", "all_gather_into_tensor"}, calls
        assert sum(calls.values()) == len(received)
        if combination_type in SILENT:
            assert not received, f"rank {rank}: {combination_type} communicated {received}"
        biggest = max(received, default=0)
        assert biggest < SHAPES[mode][0] * SHAPES[mode][1], f"rank {rank}: an [O, I]-sized collective"
        if combination_type == "svd" and len(results) > 1:  # exact: the TSQR triangles and the signs (R = 7)
            k, (out_f, in_f) = kw.get("svd_rank", 4), SHAPES[mode]
            clamp = (out_f * k if mode == "column" else k * in_f) if "svd_clamp" in kw else 0  # the split new factor
            t = len(results)
            assert sum(received) <= t * 7 * 7 + 3 * t * k + clamp, f"rank {rank}: {received}"
        if combination_type.endswith("_svd"):  # split_svd's sketches: n b, or t b^2 for the TSQR triangles
            n, b = 32, 12  # M's unsplit dimension; the converging mode's block size for r = 4
            assert biggest <= max(n * b, len(results) * b * b), f"rank {rank}: {biggest} elements"
        else:
            assert biggest < shard, f"rank {rank}: a collective of {biggest} elements (weight shard {shard})"


@pytest.mark.parametrize("combination_type,kw", CASES)
@pytest.mark.parametrize("mode", ["column", "row"])
def test_tp2_gives_the_tp1_adapter(pool2, mode, combination_type, kw):
    _check(pool2.run(weighted_job, mode, 2, combination_type, kw), mode, combination_type, kw)


@pytest.mark.parametrize("combination_type,kw", [c for c in CASES if c[0] in ("svd", "ties", "dare_ties", "ties_svd", "dare_linear_svd")])
@pytest.mark.parametrize("mode", ["column", "row"])
def test_tp4_gives_the_tp1_adapter(pool4, mode, combination_type, kw):
    _check(pool4.run(weighted_job, mode, 4, combination_type, kw), mode, combination_type, kw)
