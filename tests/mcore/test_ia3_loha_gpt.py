"""The tiny Megatron GPT of test_lora_gpt.py (2 layers, grouped-query attention, SwiGLU) with IA3
or LoHa on linear_qkv, linear_proj, linear_fc1 and linear_fc2.

IA3: output scaling on linear_qkv's k and v rows only (PEFT's Llama default), on linear_fc1's up
rows only and on linear_proj; input scaling on linear_fc2 (feedforward).  LoHa: r=4 on all four,
every factor random.  Oracle: the same model at TP=1 from the same seed.  TP=2 with sequence
parallelism off and on must give the same losses over five AdamW steps and the same consolidated
first-step gradients and the consolidated adapter tensors after the five steps (fp32, 1e-5); the adapted model must issue no more collectives than the
frozen base with only the word embedding trainable, and finalize_grads at most one all-reduce.  IA3's
untargeted q and gate rows keep scale 1: the q/gate outputs equal the base's.
"""
import pytest
import torch
import torch.distributed as dist

from tests.mcore.test_lora_gpt import TARGETS, _batch, _setup, adamw_steps, counted_step

STEPS = 5


def _config(kind):
    from parallel_adapters import IA3Config, LoHaConfig

    if kind == "ia3":
        return IA3Config(target_modules=TARGETS, feedforward_modules=["linear_fc2"], init_ia3_weights=False,
                         fused_parts={"linear_qkv": ["k", "v"], "linear_fc1": ["up"]}, seed=3)
    return LoHaConfig(r=4, alpha=8, target_modules=TARGETS, init_weights=False, seed=3)


def _consolidated_grads(adapter, groups, weights=False):
    """Full adapter gradients (or, with `weights`, the tensors themselves), gathered over TP and
    unsharded with each tensor's ShardSpec."""
    out = {}
    for _, layer in adapter.adapter_layers():
        tensors = layer.adapter_tensors("default")
        for decl in layer.tensor_decls("default"):
            tensor = tensors[decl.name]
            grad = (tensor.detach() if weights else tensor.grad).contiguous()
            pieces = [grad]
            if groups.tp_size > 1:
                pieces = [torch.empty_like(grad) for _ in range(groups.tp_size)]
                dist.all_gather(pieces, grad, group=groups.tp_group)
            out[f"{layer.module_name}.{decl.name}"] = decl.spec.unshard(pieces)
    return out


def training_job(kind, tp, sp):
    base, _, groups, get_adapter_model = _setup(tp, sp)
    adapter = get_adapter_model(base, _config(kind))
    losses, first_grads = adamw_steps(adapter, lambda: _consolidated_grads(adapter, groups))
    return losses, first_grads, _consolidated_grads(adapter, groups, weights=True)


@pytest.fixture(scope="module")
def tp1_references(pool2):
    return {kind: pool2.run(training_job, kind, 1, False)[0] for kind in ("ia3", "loha")}


@pytest.mark.parametrize("kind", ["ia3", "loha"])
@pytest.mark.parametrize("sp", [False, True])
def test_tp2_matches_tp1_losses_gradients_and_weights(pool2, tp1_references, kind, sp):
    ref_losses, ref_grads, ref_weights = tp1_references[kind]
    assert ref_losses[-1] < ref_losses[0] - 1e-3, "the reference must actually train"
    for losses, grads, weights in pool2.run(training_job, kind, 2, sp):
        assert losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-5)
        assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 4 * (1 if kind == "ia3" else 4)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)
            assert grad.abs().max() > 0, f"{name}: zero gradient makes the comparison vacuous"
        assert_weights_match(weights, ref_weights)


def assert_weights_match(weights, ref_weights):
    """The consolidated adapter tensors after the STEPS AdamW steps, within 1e-5 of TP=1's."""
    assert weights.keys() == ref_weights.keys() and weights
    for name, tensor in weights.items():
        torch.testing.assert_close(tensor, ref_weights[name], atol=1e-5, rtol=0, msg=name)


def collectives_job(sp, kind):
    base, _, _, get_adapter_model = _setup(2, sp)
    input_ids, labels = _batch()
    if kind == "frozen_base":
        step, finalize_calls = counted_step(base, None, input_ids, labels, frozen_base=True)
    else:
        adapter = get_adapter_model(base, _config(kind))
        step, finalize_calls = counted_step(adapter.model, adapter.finalize_grads, input_ids, labels)
    return dict(step.calls), finalize_calls


@pytest.mark.parametrize("sp", [False, True])
def test_adapters_add_no_collective(pool2, sp):
    base_calls, _ = pool2.run(collectives_job, sp, "frozen_base")[0]
    assert sum(base_calls.values()) > 0
    for kind in ("ia3", "loha"):
        calls, finalize_calls = pool2.run(collectives_job, sp, kind)[0]
        for op, n in calls.items():
            assert n <= base_calls.get(op, 0), f"{kind} {op}: adapted {n} > frozen base {base_calls.get(op, 0)}"
        # IA3 without SP has no gradient to sum: its only replicated vector (linear_proj's output
        # scale) sees the whole output on every rank; with SP, and for LoHa, one all-reduce.
        expected = {} if (kind == "ia3" and not sp) else {"all_reduce": 1}
        assert finalize_calls == expected, (kind, finalize_calls)


def untargeted_rows_job():
    """Scales set to 2 everywhere: linear_qkv's q rows and linear_fc1's gate rows are the base's."""
    from parallel_adapters.adapters.kinds.ia3 import fused_row_mask

    base, _, _, get_adapter_model = _setup(1, False)
    adapter = get_adapter_model(base, _config("ia3"))
    layer = adapter.model.decoder.layers[0].self_attention.linear_qkv
    fc1 = adapter.model.decoder.layers[0].mlp.linear_fc1
    x = torch.randn(3, 1, layer.geometry.in_features)
    out = {}
    for name, host in (("qkv", layer), ("fc1", fc1)):
        with torch.no_grad():
            host.adapter_tensors("default")["ia3_l"].fill_(2.0)
            y = host(x)[0]
            with adapter.disable_adapter():
                y0 = host(x)[0]
        mask = fused_row_mask(host.geometry, host.ia3_parts["default"])
        out[name] = (torch.equal(y[..., ~mask], y0[..., ~mask]), torch.allclose(y[..., mask], 2 * y0[..., mask]),
                     int(mask.sum()), host.adapter_tensors("default")["ia3_l"].shape)
    try:  # PEFT's format has no fused modules: the sharded checkpoint + export_peft route splits them
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            adapter.save_pretrained(tmp)
        out["save_pretrained"] = "written"
    except ValueError as exc:
        out["save_pretrained"] = str(exc)
    return out


def test_untargeted_rows_keep_scale_one(pool2):
    out = pool2.run(untargeted_rows_job)[0]
    assert out["qkv"][:2] == (True, True) and out["qkv"][2] == 2 * 2 * 16  # k, v: 2 groups x head size 16
    assert out["qkv"][3] == (64, 1)
    assert out["fc1"][:2] == (True, True) and out["fc1"][3] == (128, 1)  # the up half of 2 x 128 rows
    assert "linear_qkv: adapter 'default' covers only parts of a fused module" in out["save_pretrained"]
