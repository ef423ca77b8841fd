"""A tiny Megatron GPT (2 layers, grouped-query attention, SwiGLU) with LoRA on linear_qkv,
linear_proj, linear_fc1 and linear_fc2.

Oracle: the same model at TP=1 built from the same seed.  TP=2 with sequence parallelism off
and on must give the same losses over five AdamW steps and the same consolidated adapter
gradients (fp32, 1e-5); merge / unmerge / merge_and_unload must be exact; and the adapted model
must issue no more collectives than the frozen base with only the word embedding trainable.
"""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.harness import counting

SEQ, BATCH, STEPS = 16, 2, 5
TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]


def _setup(tp, sp, r=4, seed=0):
    from parallel_adapters import LoraConfig, get_adapter_model
    from parallel_adapters.mcore import cpu
    from parallel_adapters.mcore.compat import initialize_model_parallel
    from parallel_adapters.mcore.gpt import GPTSettings, build_gpt

    cpu.enable_cpu_mode()
    groups = initialize_model_parallel(tp, 1)
    cpu.model_parallel_seed(1234)
    base = build_gpt(GPTSettings(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                                 num_query_groups=2, vocab_size=100, sequence_parallel=sp))
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights=False, seed=seed)
    return base, config, groups, get_adapter_model


def _batch():
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 100, (BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _loss(model, input_ids, labels):
    from parallel_adapters.mcore.gpt import gpt_logits

    logits = gpt_logits(model, input_ids)
    return F.cross_entropy(logits.double().flatten(0, 1), labels.flatten())


def _consolidated_grads(adapter, groups):
    """Full adapter gradients, gathered over TP and unsharded with each factor's ShardSpec."""
    out = {}
    for _, layer in adapter.adapter_layers():
        for factor, spec in (("lora_A", layer.spec_a), ("lora_B", layer.spec_b)):
            grad = getattr(layer, factor)["default"].weight.grad.contiguous()
            pieces = [torch.empty_like(grad) for _ in range(groups.tp_size)]
            if groups.tp_size > 1:
                dist.all_gather(pieces, grad, group=groups.tp_group)
            else:
                pieces = [grad]
            out[f"{layer.module_name}.{factor}"] = spec.unshard(pieces)
    return out


def adamw_steps(adapter, first_step_grads):
    """STEPS AdamW steps (lr 1e-2) on _batch() with finalize_grads: (losses, first_step_grads()
    taken after the first backward)."""
    input_ids, labels = _batch()
    optimizer = torch.optim.AdamW([p for p in adapter.parameters() if p.requires_grad], lr=1e-2)
    losses, first_grads = [], None
    for step in range(STEPS):
        optimizer.zero_grad()
        loss = _loss(adapter.model, input_ids, labels)
        loss.backward()
        adapter.finalize_grads()
        if step == 0:
            first_grads = first_step_grads()
        optimizer.step()
        losses.append(loss.item())
    return losses, first_grads


def training_job(tp, sp):
    base, config, groups, get_adapter_model = _setup(tp, sp)
    adapter = get_adapter_model(base, config)
    losses, first_grads = adamw_steps(adapter, lambda: _consolidated_grads(adapter, groups))
    return losses, first_grads


@pytest.fixture(scope="module")
def tp1_reference(pool2):
    return pool2.run(training_job, 1, False)[0]


@pytest.mark.parametrize("sp", [False, True])
def test_tp2_matches_tp1_losses_and_gradients(pool2, tp1_reference, sp):
    ref_losses, ref_grads = tp1_reference
    assert ref_losses[-1] < ref_losses[0] - 1e-3, "the reference must actually train"
    for losses, grads in pool2.run(training_job, 2, sp):
        assert losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-5)
        assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 4 * 2
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)
            assert grad.abs().max() > 0, f"{name}: zero gradient makes the comparison vacuous"


def merge_job():
    base, config, groups, get_adapter_model = _setup(2, False)
    adapter = get_adapter_model(base, config)
    input_ids, _ = _batch()
    from parallel_adapters.mcore.gpt import gpt_logits

    with torch.no_grad():
        with adapter.disable_adapter():
            base_logits = gpt_logits(adapter.model, input_ids)
        adapted = gpt_logits(adapter.model, input_ids)
        originals = {n: l.weight.detach().clone() for n, l in adapter.adapter_layers()}
        adapter.merge_adapter()
        merged = gpt_logits(adapter.model, input_ids)
        adapter.unmerge_adapter()
        restored_exactly = all(torch.equal(l.weight, originals[n]) for n, l in adapter.adapter_layers())
        plain = adapter.merge_and_unload()
        from parallel_adapters.adapters.hosts.base import AdapterHost as LoRALayerBase

        no_wrappers = not any(isinstance(m, LoRALayerBase) for m in plain.modules())
        unloaded = gpt_logits(plain, input_ids)
    return {
        "adapter_changes_output": (adapted - base_logits).abs().max().item(),
        "merged": (merged - adapted).abs().max().item(),
        "unloaded": (unloaded - adapted).abs().max().item(),
        "restored_exactly": restored_exactly,
        "no_wrappers": no_wrappers,
    }


def test_merge_unmerge_and_unload_at_tp2(pool2):
    for result in pool2.run(merge_job):
        assert result["adapter_changes_output"] > 1e-3
        assert result["merged"] < 1e-6 and result["unloaded"] < 1e-6
        assert result["restored_exactly"] and result["no_wrappers"]


def counted_step(model, finalize, input_ids, labels, frozen_base: bool = False):
    """One counted forward + backward of `model`, then `finalize` (finalize_grads) counted on its own;
    frozen_base: `model` is the base, frozen but for the word embedding (the comparison point).
    Returns the step's counter and finalize's calls ({} without one)."""
    if frozen_base:
        for p in model.parameters():
            p.requires_grad_(False)
        model.embedding.word_embeddings.weight.requires_grad_(True)
    with counting.counted() as step:
        _loss(model, input_ids, labels).backward()
    if finalize is None:
        return step, {}
    with counting.counted() as fin:
        finalize()
    return step, dict(fin.calls)


def collectives_job(sp, variant):
    base, config, groups, get_adapter_model = _setup(2, sp)
    input_ids, labels = _batch()
    if variant == "frozen_base":
        step, finalize_calls = counted_step(base, None, input_ids, labels, frozen_base=True)
    else:
        adapter = get_adapter_model(base, config.replace(use_dora=variant == "dora"))
        step, finalize_calls = counted_step(adapter.model, adapter.finalize_grads, input_ids, labels)
    return dict(step.calls), dict(step.bytes), finalize_calls


@pytest.mark.parametrize("sp", [False, True])
def test_adapters_add_no_collective(pool2, sp):
    base_calls, base_bytes, _ = pool2.run(collectives_job, sp, "frozen_base")[0]
    ours_calls, ours_bytes, finalize_calls = pool2.run(collectives_job, sp, "lora")[0]
    assert sum(base_calls.values()) > 0
    for op, n in ours_calls.items():
        assert n <= base_calls.get(op, 0), f"{op}: adapted {n} > frozen base {base_calls.get(op, 0)}"
    assert finalize_calls == {"all_reduce": 1}
    # DoRA: its row norms ride inside the row layers' own reductions: LoRA's collectives exactly.
    dora_calls, _, dora_finalize = pool2.run(collectives_job, sp, "dora")[0]
    assert dora_calls == ours_calls and dora_finalize == {"all_reduce": 1}


def recompute_job(dropout: float):
    """Full activation recompute at TP=2 + SP: the adapter gradients equal the plain run's, LoRA
    dropout included (its masks come from an RNG-tracker state that the replay restores).
    Returns (max gradient difference, how much dropout changed the gradients)."""
    from megatron.core import tensor_parallel

    base, config, groups, get_adapter_model = _setup(2, True)
    base.config.recompute_granularity, base.config.recompute_method = "full", "uniform"
    base.config.recompute_num_layers = 1
    adapter = get_adapter_model(base, config.replace(lora_dropout=dropout))
    tracker = tensor_parallel.get_cuda_rng_tracker()
    start = dict(tracker.get_states())  # before the dropout streams exist: each run adds them afresh
    input_ids, labels = _batch()
    grads = []
    for granularity, training in (("full", True), (None, True), (None, False)):
        tracker.set_states(dict(start))
        base.config.recompute_granularity = granularity
        adapter.train(training)
        adapter.zero_grad()
        _loss(adapter.model, input_ids, labels).backward()
        adapter.finalize_grads()
        grads.append(_consolidated_grads(adapter, groups))
    diff = lambda x, y: max((x[k] - y[k]).abs().max().item() for k in x)  # noqa: E731
    return diff(grads[0], grads[1]), diff(grads[1], grads[2])


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_activation_recompute_gives_the_plain_gradients(pool2, dropout):
    for recompute_err, dropout_effect in pool2.run(recompute_job, dropout):
        assert recompute_err < 1e-6
        assert (dropout_effect > 1e-3) == (dropout > 0)  # the masks did act
