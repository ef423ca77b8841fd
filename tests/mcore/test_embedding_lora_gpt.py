"""LoRA on the word embedding and on the output layer of a tiny Megatron GPT (the vocabulary, 100,
is padded to 104 rows), untied and tied; and DoRA (use_dora=True) on all four linears, the word
embedding and the output layer.

Oracle: the same model at TP=1 from the same seed.  TP=2 with sequence parallelism off and on
gives the same losses over five AdamW steps, the same consolidated adapter gradients and the same
consolidated adapter weights after them (fp32, 1e-5), and so does PP=2; the adapted model issues
no more collectives than the frozen base with the word embedding trainable, and finalize_grads is
one all-reduce.  A tied output layer is adapted in
its projection only (as PEFT adapts `lm_head` only) and refuses to merge.
"""
import pytest
import torch
import torch.distributed as dist

from tests.mcore.test_lora_gpt import STEPS, _batch, adamw_steps, counted_step

TARGETS = ["linear_qkv", "word_embeddings", "output_layer"]
DORA_TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "word_embeddings", "output_layer"]
VARIANTS = {"untied": (False, False), "tied": (True, False), "dora": (False, True)}  # name: (tied, use_dora)


def _adapted(tp, sp, tied, use_dora=False):
    from parallel_adapters import LoraConfig, get_adapter_model
    from parallel_adapters.mcore import cpu
    from parallel_adapters.mcore.compat import initialize_model_parallel
    from parallel_adapters.mcore.gpt import GPTSettings, build_gpt

    cpu.enable_cpu_mode()
    groups = initialize_model_parallel(tp, 1)
    cpu.model_parallel_seed(1234)
    base = build_gpt(GPTSettings(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                                 num_query_groups=2, vocab_size=100, sequence_parallel=sp, tie_embeddings=tied))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=DORA_TARGETS if use_dora else TARGETS,
                        init_lora_weights=False, seed=0, use_dora=use_dora)
    return get_adapter_model(base, config), groups


def _consolidated(adapter, groups, what="grad"):
    """Every adapter tensor's full gradient (or value): gathered over TP, unsharded with its spec."""
    out = {}
    for _, layer in adapter.adapter_layers():
        tensors = layer.adapter_tensors("default")
        for decl in layer.tensor_decls("default"):
            grad = (tensors[decl.name].grad if what == "grad" else tensors[decl.name].detach()).contiguous()
            pieces = [torch.empty_like(grad) for _ in range(groups.tp_size)]
            dist.all_gather(pieces, grad, group=groups.tp_group)
            out[f"{layer.module_name}.{decl.name}"] = decl.spec.unshard(pieces)
    return out


def training_job(tp, sp, tied, use_dora=False):
    adapter, groups = _adapted(tp, sp, tied, use_dora)
    losses, first_grads = adamw_steps(adapter, lambda: _consolidated(adapter, groups))
    return losses, first_grads, _consolidated(adapter, groups, "value")


@pytest.fixture(scope="module", params=list(VARIANTS))
def tp1_reference(request, pool2):
    return request.param, pool2.run(training_job, 1, False, *VARIANTS[request.param])[0]


@pytest.mark.parametrize("sp", [False, True])
def test_tp2_matches_tp1(pool2, tp1_reference, sp):
    variant, (ref_losses, ref_grads, ref_weights) = tp1_reference
    assert ref_losses[-1] < ref_losses[0] - 1e-3, "the reference must actually train"
    assert {"embedding.word_embeddings.lora_embedding_A", "output_layer.lora_B"} <= set(ref_grads)
    if variant == "dora":
        assert sum("lora_magnitude_vector" in n for n in ref_grads) == 2 * 4 + 2
    for losses, grads, weights in pool2.run(training_job, 2, sp, *VARIANTS[variant]):
        assert losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-5)
        assert grads.keys() == ref_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)
            assert grad.abs().max() > 0, f"{name}: zero gradient makes the comparison vacuous"
            torch.testing.assert_close(weights[name], ref_weights[name], atol=1e-5, rtol=1e-4, msg=name)


def collectives_job(sp, variant):
    adapter, _ = _adapted(2, sp, False, use_dora=variant == "dora")
    input_ids, labels = _batch()
    if variant == "frozen_base":
        step, finalize_calls = counted_step(adapter.unload(), None, input_ids, labels, frozen_base=True)
    else:
        step, finalize_calls = counted_step(adapter.model, adapter.finalize_grads, input_ids, labels)
    return dict(step.calls), finalize_calls


@pytest.mark.parametrize("sp", [False, True])
def test_embedding_and_output_adapters_add_no_collective(pool2, sp):
    base_calls, _ = pool2.run(collectives_job, sp, "frozen_base")[0]
    for variant in ("lora", "dora"):
        ours_calls, finalize_calls = pool2.run(collectives_job, sp, variant)[0]
        assert sum(base_calls.values()) > 0
        for op, n in ours_calls.items():
            assert n <= base_calls.get(op, 0), f"{variant} {op}: adapted {n} > frozen base {base_calls.get(op, 0)}"
        assert finalize_calls == {"all_reduce": 1}, variant


def tied_merge_job():
    adapter, _ = _adapted(2, False, True)
    table = adapter.model.embedding.word_embeddings.weight.detach().clone()
    qkv = adapter.model.decoder.layers[0].self_attention.linear_qkv.weight.detach().clone()
    try:
        adapter.merge_adapter()
    except ValueError as exc:
        message = str(exc)
    else:
        message = ""
    unchanged = (torch.equal(table, adapter.model.embedding.word_embeddings.weight)
                 and torch.equal(qkv, adapter.model.decoder.layers[0].self_attention.linear_qkv.weight))
    return message, unchanged


def test_tied_output_layer_refuses_to_merge(pool2):
    for message, table_unchanged in pool2.run(tied_merge_job):
        assert "word_embeddings" in message and "tied" in message
        assert table_unchanged, "nothing is merged when one layer refuses"


def untied_merge_job(sp):
    from parallel_adapters.mcore.gpt import gpt_logits

    adapter, _ = _adapted(2, sp, False)
    input_ids, _ = _batch()
    with torch.no_grad():
        with adapter.disable_adapter():
            base = gpt_logits(adapter.model, input_ids)
        adapted = gpt_logits(adapter.model, input_ids)
        merged = gpt_logits(adapter.merge_and_unload(), input_ids)
    return (adapted - base).abs().max().item(), (merged - adapted).abs().max().item()


@pytest.mark.parametrize("sp", [False, True])
def test_untied_merge_and_unload(pool2, sp):
    for changes, merge_error in pool2.run(untied_merge_job, sp):
        assert changes > 1e-3 and merge_error < 1e-5


def pipeline_job(pp, tied, use_dora=False):
    """Five AdamW steps through Megatron's pipeline schedule (TP=1, two micro-batches): the mean
    losses (last stage), this stage's adapter gradients at the first step and its adapter weights
    after the last, under their global names."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from parallel_adapters import LoraConfig, get_adapter_model
    from parallel_adapters.mcore import cpu
    from parallel_adapters.mcore.compat import initialize_model_parallel
    from parallel_adapters.mcore.gpt import GPTSettings, build_gpt
    from tests.mcore.gpt_jobs import _lm_step

    cpu.enable_cpu_mode()
    groups = initialize_model_parallel(1, pp)
    settings = GPTSettings(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                           num_query_groups=2, vocab_size=100, tie_embeddings=tied)
    cpu.model_parallel_seed(settings.seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=DORA_TARGETS if use_dora else TARGETS,
                        init_lora_weights=False, seed=0, use_dora=use_dora)
    adapter = get_adapter_model(build_gpt(settings), config, groups=groups)
    input_ids, labels = _batch()
    optimizer = torch.optim.AdamW([p for p in adapter.parameters() if p.requires_grad], lr=1e-2)
    tensors = {f"{layer.module_name}.{name}": t for _, layer in adapter.adapter_layers()
               for name, t in layer.adapter_tensors("default").items()}
    losses, first_grads = [], None
    for step in range(STEPS):
        optimizer.zero_grad()
        micro = list(zip(input_ids.chunk(2), labels.chunk(2)))
        out = get_forward_backward_func()(forward_step_func=_lm_step, data_iterator=iter(micro),
                                          model=[adapter.model], num_microbatches=2, seq_length=input_ids.shape[1],
                                          micro_batch_size=1, forward_only=False)
        adapter.finalize_grads()
        if step == 0:
            first_grads = {n: t.grad.clone() for n, t in tensors.items()}
        optimizer.step()
        if groups.is_last_stage:
            losses.append(torch.stack([d["loss"] for d in out]).mean().item())
    return losses, first_grads, {n: t.detach().clone() for n, t in tensors.items()}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_pp2_matches_pp1(pool2, variant):
    ref_losses, ref_grads, ref_weights = pool2.run(pipeline_job, 1, *VARIANTS[variant])[0]
    stages = pool2.run(pipeline_job, 2, *VARIANTS[variant])
    assert ref_losses[-1] < ref_losses[0] - 1e-3, "the reference must actually train"
    assert stages[1][0] == pytest.approx(ref_losses, rel=1e-5, abs=1e-5)
    grads, weights = {**stages[0][1], **stages[1][1]}, {**stages[0][2], **stages[1][2]}
    assert grads.keys() == ref_grads.keys() and "output_layer.lora_A" in grads
    assert "embedding.word_embeddings.lora_embedding_B" in stages[0][1]
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-6, rtol=1e-5, msg=name)
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(weights[name], ref_weights[name], atol=1e-5, rtol=1e-4, msg=name)
