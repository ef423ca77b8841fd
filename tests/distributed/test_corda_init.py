"""Real gloo ranks (TP 2), float64: CorDA ("ipm", "kpm") on Megatron's ColumnParallelLinear /
RowParallelLinear, sequence parallelism off and on, the covariance collected by EVA's hooks
through `initialize_corda_weights`.

Oracle: a dense float64 CorDA of the whole W and the whole covariance (PEFT's math: damped
inverse, SVD of W C, IPM top r / KPM last r, A = sqrt(S/s) (F^-1 Vh^T)^T, B = U sqrt(S/s)) with
our sign convention, which is also what TP=1 computes.  Checked on every rank: A and B shards,
the residual base shard, the covariance part each rank holds, and that the output is unchanged.

Also: real TP=4 ranks; the cache / covariance files at TP=2 read back into the same adapter;
PP=2 through Megatron's forward-only schedule (EVA's capture) against the world-1 adapter.

"No block of W": every collective's received tensor is recorded: none has a weight-shaped pair
of dims ([O, I], [O, I/t], [O/t, I] or transposed), only all-reduce / all-gather are issued, and
the total stays under the bound decompose/corda.py and eva/corda_stats.py state.
"""
import pytest
import torch
import torch.distributed as dist

from tests.distributed.test_decomposition_init import planted, planted_tp_linear

TOL = 1e-6
R, ALPHA, SEQ, NSEQ = 3, 6, 8, 5
SHAPES = {"column": (48, 32), "row": (32, 48)}  # W [O, I]


def calibration(in_f):
    g = torch.Generator().manual_seed(11)
    return torch.randn(NSEQ, SEQ, in_f, generator=g, dtype=torch.float64) * torch.linspace(
        0.5, 2.0, in_f, dtype=torch.float64)


def dense_corda(w, x, r, method, s):
    """PEFT's preprocess_corda + corda_init on whole tensors, our signs."""
    cov = sum((xs / xs.max().abs()).T @ (xs / xs.max().abs()) for xs in x) / x.shape[0]
    eye, damp = torch.eye(cov.shape[0], dtype=cov.dtype), 0.01
    while True:
        fixed = cov + eye * torch.diagonal(cov).mean() * damp
        inv = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inv, eye) < 0.05:
            break
        damp *= 2
    u, sv, vh = torch.linalg.svd(w @ fixed, full_matrices=False)
    keep = slice(0, r) if method == "ipm" else slice(sv.shape[0] - r, sv.shape[0])
    u, sv, vh = u[:, keep], sv[keep], vh[keep]
    signs = torch.sign(vh.gather(1, vh.abs().argmax(dim=1, keepdim=True)))
    root = (sv / s).sqrt()
    return root[:, None] * (inv @ (vh * signs).T).T, u * signs.T * root, cov


def corda_job(mode, sp, method, record=False, dp=False):
    from parallel_adapters import LoraConfig, get_adapter_model
    from parallel_adapters.config import CordaConfig, lora_scaling
    from parallel_adapters.distributed.sharding import ShardSpec
    from parallel_adapters.eva.corda import collect_covariances, initialize_corda_weights
    from parallel_adapters.mcore.compat import initialize_model_parallel
    from tests.distributed.test_lora_layers import _Host

    tp = 1 if dp else dist.get_world_size()  # dp: two data-parallel replicas of a TP=1 layer
    groups = initialize_model_parallel(tp, 1)
    rank = groups.tp_rank
    out_f, in_f = SHAPES[mode]
    base, w, w_spec = planted_tp_linear(mode, out_f, in_f, tp, sp, rank)
    x = calibration(in_f)

    def local(batch):  # [b, S, I] -> this rank's Megatron input [S(/t), b, I(/t)]
        sbh = batch.transpose(0, 1)
        if mode == "row":
            return ShardSpec(dim=2).shard(sbh, rank, tp)
        return ShardSpec(dim=0).shard(sbh, rank, tp) if sp else sbh

    lora = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["proj"], init_lora_weights="corda",
                      corda_config=CordaConfig(corda_method=method), seed=4)
    model = get_adapter_model(_Host(base), lora, groups=groups)
    forward = lambda m, batch: m(local(batch))  # noqa: E731
    loader = [x[:3], x[3:]] if not dp else [x[:3]] if dist.get_rank() == 0 else [x[3:4], x[4:]]
    if record:
        return _recorded(lambda: initialize_corda_weights(model, loader, forward_fn=forward, show_progress_bar=False))
    cov_local = collect_covariances(model, loader, forward_fn=forward)["proj"]
    y_before, _ = model(local(x))
    initialize_corda_weights(model, loader, forward_fn=forward, show_progress_bar=False)
    y_after, _ = model(local(x))
    layer = model.model.proj
    s = lora_scaling(ALPHA, R, False)
    a_ref, b_ref, cov = dense_corda(w, x, R, method, s)
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    cov_spec = ShardSpec(dim=0) if mode == "row" else ShardSpec()
    return {
        "A": (a - layer.spec_a.shard(a_ref, rank, tp)).abs().max().item(),
        "B": (b - layer.spec_b.shard(b_ref, rank, tp)).abs().max().item(),
        "residual": (layer.weight.detach() - w_spec.shard(w - s * b_ref @ a_ref, rank, tp)).abs().max().item(),
        "covariance": (cov_local - cov_spec.shard(cov, rank, tp)).abs().max().item(),
        "y": (y_after - y_before).abs().max().item(),
    }


def _recorded(fn):
    from tests.harness import counting

    with counting.received() as received, counting.counted() as calls:
        fn()
    return received, dict(calls.calls)


@pytest.mark.parametrize("method", ["ipm", "kpm"])
@pytest.mark.parametrize("mode,sp", [("column", False), ("column", True), ("row", False), ("row", True)])
def test_tp2_gives_the_dense_tp1_adapter(pool2, mode, sp, method):
    for rank, errors in enumerate(pool2.run(corda_job, mode, sp, method)):
        assert max(errors.values()) < TOL, f"rank {rank}: {errors}"


def test_dp2_pools_the_covariance_once(pool2):
    """Each DP replica sees its own sequences (3 and 2): the adapter is the one of all 5."""
    for rank, errors in enumerate(pool2.run(corda_job, "column", False, "ipm", False, True)):
        assert max(errors.values()) < TOL, f"rank {rank}: {errors}"


@pytest.mark.parametrize("mode,sp", [("column", True), ("row", False)])
def test_no_collective_carries_a_block_of_w(pool2, mode, sp):
    out_f, in_f = SHAPES[mode]
    t = 2
    weightlike = {(out_f, in_f), (in_f, out_f), (out_f, in_f // t), (in_f // t, out_f), (out_f // t, in_f),
                  (in_f, out_f // t)}
    for rank, (received, calls) in enumerate(pool2.run(corda_job, mode, sp, "ipm", True)):
        assert set(calls) <= {"all_reduce", "all_gather_into_tensor"}, calls
        assert sum(calls.values()) == len(received)
        for op, shape in received:
            flat = [d for d in shape if d != t] if op == "all_gather" else list(shape)
            assert not any(tuple(flat[i:i + 2]) in weightlike for i in range(len(flat) - 1)), (op, shape)
        total = sum(torch.Size(shape).numel() for _, shape in received)
        n = out_f if mode == "row" else in_f  # the unsplit dimension of M
        b = R + 8  # split_svd's converging block for r = 3
        passes = sum(1 for op, shape in received if shape == (t, b, b))  # one TSQR gather per pass
        assert passes >= 2
        calibration = NSEQ * (SEQ * in_f if mode == "row" else 1) + (in_f * in_f + 1 if sp else 0)
        row_extra = in_f * in_f + in_f * R if mode == "row" else 0  # C's rows gathered once; V's rows
        forward = NSEQ * SEQ * (in_f if mode == "column" else out_f)  # Megatron's own SP gather / row reduce
        per_iteration = n * b + t * b * b + 1 + (2 * in_f * b if mode == "row" else 0)
        assert total <= forward + calibration + row_extra + per_iteration * passes + 3 * t * R, (rank, total)


@pytest.mark.parametrize("mode,sp,method", [("column", True, "kpm"), ("row", False, "ipm")])
def test_tp4_gives_the_dense_tp1_adapter(pool4, mode, sp, method):
    for rank, errors in enumerate(pool4.run(corda_job, mode, sp, method)):
        assert max(errors.values()) < TOL, f"rank {rank}: {errors}"


def corda_files_job(directory):
    """TP=2 row host: a CorDA run writing cache_file and covariance_file (prune_temporary_fields=False
    keeps C on the host), then two fresh models reading them back (the cache; then, with the caches
    removed, the covariance): the same adapter, bit for bit; the file names carry the layout."""
    import os

    from megatron.core.tensor_parallel import RowParallelLinear
    from megatron.core.transformer import TransformerConfig

    from parallel_adapters import LoraConfig, get_adapter_model
    from parallel_adapters.config import CordaConfig
    from parallel_adapters.distributed.sharding import ShardSpec
    from parallel_adapters.eva.corda import collect_covariances, initialize_corda_weights
    from parallel_adapters.mcore.compat import initialize_model_parallel
    from tests.distributed.test_lora_layers import _Host

    tp = dist.get_world_size()
    groups = initialize_model_parallel(tp, 1)
    out_f, in_f = SHAPES["row"]
    config = TransformerConfig(num_layers=1, hidden_size=in_f, num_attention_heads=4, use_cpu_initialization=True,
                               params_dtype=torch.float64, gradient_accumulation_fusion=False,
                               tensor_model_parallel_size=tp)
    w, x = planted(out_f, in_f), calibration(in_f)
    files = dict(cache_file=f"{directory}/cache.safetensors", covariance_file=f"{directory}/cov.safetensors")
    lora = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["proj"], init_lora_weights="corda", seed=4,
                      corda_config=CordaConfig(prune_temporary_fields=False, **files))
    forward = lambda m, batch: m(ShardSpec(dim=2).shard(batch.transpose(0, 1), groups.tp_rank, tp))  # noqa: E731

    def adapted(loader):
        base = RowParallelLinear(in_f, out_f, config=config, init_method=torch.nn.init.zeros_, bias=False,
                                 input_is_parallel=True, skip_bias_add=False)
        with torch.no_grad():
            base.weight.copy_(ShardSpec(dim=1).shard(w, groups.tp_rank, tp))
        model = get_adapter_model(_Host(base), lora, groups=groups)
        initialize_corda_weights(model, loader, forward_fn=forward, show_progress_bar=False)
        layer = model.model.proj
        return model, [layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach(),
                       layer.weight.detach()]

    first, tensors = adapted([x[:3], x[3:]])
    kept = first.model.proj.__dict__.get("corda_covariance")
    cov_local = collect_covariances(first, [x[:3], x[3:]], forward_fn=forward)["proj"]
    suffix = f".tp{groups.tp_rank}of{tp}.pp0of1.safetensors"
    names = sorted(os.listdir(directory))
    _, from_cache = adapted(None)
    dist.barrier()
    os.remove(f"{directory}/cache{suffix}")
    dist.barrier()
    _, from_covariance = adapted(None)
    return {
        "names": names, "suffix": suffix,
        "kept": kept is not None and torch.equal(kept, cov_local),
        "cache": all(torch.equal(a, b) for a, b in zip(tensors, from_cache)),
        "covariance": all(torch.equal(a, b) for a, b in zip(tensors, from_covariance)),
    }


def test_tp2_cache_and_covariance_files_reproduce_the_adapter(pool2, tmp_path):
    results = pool2.run(corda_files_job, str(tmp_path))
    for rank, res in enumerate(results):
        assert f"cache{res['suffix']}" in res["names"] and f"cov{res['suffix']}" in res["names"], res["names"]
        assert res["kept"] and res["cache"] and res["covariance"], (rank, res)
    assert len(results[0]["names"]) == 4


def corda_gpt_job(pp, batches, targets):
    """CorDA on eva_jobs' GPT through Megatron's own forward (forward_fn=None: PP through the
    forward-only schedule): {module: (A, B, base weight)} on the stage that owns it."""
    from parallel_adapters import LoraConfig, ParallelGroups, get_adapter_model
    from parallel_adapters.eva.corda import initialize_corda_weights
    from parallel_adapters.eva.state import eva_layers
    from tests.distributed.eva_jobs import _gpt

    model, groups = _gpt(1, pp, False)
    if pp == 1:  # the world-1 reference inside the pool (see eva_jobs.gpt_eva)
        groups = ParallelGroups(tp_group=groups.tp_group, pp_group=groups.tp_group, dp_group=groups.tp_group)
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(targets), init_lora_weights="corda", seed=4)
    adapted = get_adapter_model(model, config, groups=groups)
    initialize_corda_weights(adapted, batches, show_progress_bar=False)  # every PP rank: the same batches
    return {n: (h.adapter_tensors("default")["lora_A"].detach().clone(),
                h.adapter_tensors("default")["lora_B"].detach().clone(), h.weight.detach().clone())
            for _, h in eva_layers(adapted, "default") for n in [h.module_name]}  # global names


def corda_pp_job(batches, targets):
    from parallel_adapters.mcore import compat

    reference = corda_gpt_job(1, batches, targets)  # every rank (building the model parallel state is collective)
    compat.destroy_model_parallel()
    dist.barrier()
    return reference, corda_gpt_job(2, batches, targets)


def test_pp2_collects_through_the_pipeline_and_gives_the_pp1_adapter(pool2):
    """PP=2 (EVA's forward-only pipeline capture): each stage's targets get the world-1 adapter."""
    from tests.distributed.eva_jobs import token_batches

    targets = ("decoder.layers.0.self_attention.linear_qkv", "decoder.layers.1.mlp.linear_fc2")
    results = pool2.run(corda_pp_job, token_batches(2, batch=2, seq=8), targets)
    reference = results[0][0]
    owned = [set(stage) for _, stage in results]
    assert owned[0] == {targets[0]} and owned[1] == {targets[1]}, owned
    for _, stage in results:
        for name, tensors in stage.items():
            for what, got, want in zip(("A", "B", "W"), tensors, reference[name]):
                assert (got - want).abs().max().item() < TOL, (name, what)
