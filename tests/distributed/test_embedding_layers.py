"""Real gloo ranks (TP 1, 2, 4), float64: LoRA on Megatron's own VocabParallelEmbedding against a
dense float64 lookup, y = W[ids] + s A^T[ids] B^T.

Checked on every rank: the output (the rank's sequence shard under sequence parallelism), this
rank's gradients of A (split with the table's rows) and of B (replicated, summed by
finalize_grads), and that the adapter adds no collective to the embedding's own.
"""
import pytest
import torch
import torch.nn.functional as F

from tests.harness import counting

TOL = 1e-10
VOCAB, WIDTH, R, SEQ, BATCH = 24, 8, 3, 8, 2


class _Host(torch.nn.Module):
    def __init__(self, embed):
        super().__init__()
        self.word_embeddings = embed

    def forward(self, ids):
        return self.word_embeddings(ids)


def _full_problem():
    g = torch.Generator().manual_seed(99)
    w = torch.randn(VOCAB, WIDTH, generator=g, dtype=torch.float64)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    ids[0, :3] = torch.tensor([0, VOCAB - 1, VOCAB // 2])  # both ends of the table and a shard edge
    out_shape = (BATCH, SEQ, WIDTH)
    return w, ids, torch.randn(*out_shape, generator=g, dtype=torch.float64)


def _build(tp, sp, use_dora=False):
    from megatron.core.tensor_parallel import VocabParallelEmbedding
    from megatron.core.transformer import TransformerConfig

    from parallel_adapters import LoraConfig, get_adapter_model
    from parallel_adapters.mcore.compat import initialize_model_parallel

    groups = initialize_model_parallel(tp, 1)
    config = TransformerConfig(num_layers=1, hidden_size=WIDTH, num_attention_heads=4, use_cpu_initialization=True,
                               params_dtype=torch.float64, sequence_parallel=sp, tensor_model_parallel_size=tp)
    base = VocabParallelEmbedding(VOCAB, WIDTH, init_method=torch.nn.init.zeros_, reduce_scatter_embeddings=sp,
                                  config=config)
    w, ids, dy = _full_problem()
    with torch.no_grad():
        base.weight.copy_(w[base.vocab_start_index:base.vocab_end_index])
    lora = LoraConfig(r=R, lora_alpha=6, target_modules=["word_embeddings"], init_lora_weights=False, seed=5,
                      use_dora=use_dora)
    model = get_adapter_model(_Host(base), lora, groups=groups)
    if use_dora:  # move the magnitude off its initial norms (a replicated tensor: alike on every rank)
        with torch.no_grad():
            m = model.model.word_embeddings.lora_magnitude_vector["default"].weight
            m.add_(0.3 * torch.cos(7 * m))
    return model, model.model.word_embeddings, groups, (w, ids, dy)


def _dense_reference(w, ids, dy, magnitude=None):
    """LoRA: y = W[ids] + s A^T[ids] B^T.  DoRA (PEFT's DoraEmbeddingLayer): y scaled per width
    column by m / ||W + s (B A)^T||, the norm down the table's columns, detached."""
    from parallel_adapters.adapters import embedding_conv_math as ecm
    from parallel_adapters.adapters import functional as lf

    generator = torch.Generator().manual_seed(lf.factor_seed(5, "word_embeddings", "default"))
    a, b = ecm.init_lora_embedding(VOCAB, WIDTH, R, False, generator)
    a, b = a.requires_grad_(), b.requires_grad_()
    y = F.embedding(ids, w) + 2.0 * (a.t()[ids] @ b.t())  # s = 6 / 3
    grads = [a, b]
    if magnitude is not None:
        m = magnitude.clone().requires_grad_()
        norm = (w + 2.0 * (b @ a).t()).norm(dim=0).detach()
        y = y * (m / norm)
        grads.append(m)
    y.backward(dy)
    return (y.detach(), *(t.grad for t in grads))


def embedding_parity_job(tp, sp, use_dora=False):
    from parallel_adapters.distributed.sharding import ShardSpec

    model, host, groups, (w, ids, dy) = _build(tp, sp, use_dora)
    rank = groups.tp_rank
    magnitude = host.lora_magnitude_vector["default"].weight.detach() if use_dora else None
    y_ref, da_ref, db_ref, *dm_ref = _dense_reference(w, ids, dy, magnitude)
    # Megatron's layout: [b, s, h] without SP; the [s, b, h] transpose, sequence-sharded, with it.
    local = (lambda t: ShardSpec(dim=0).shard(t.transpose(0, 1), rank, tp)) if sp else (lambda t: t)  # noqa: E731
    with counting.counted() as fwd_bwd:
        y = model(ids)
        y.backward(local(dy))
    with counting.counted() as finalize:
        model.finalize_grads()
    a = host.lora_embedding_A["default"].weight
    b = host.lora_embedding_B["default"].weight
    errors = {
        "y": (y.detach() - local(y_ref)).abs().max().item(),
        "dA": (a.grad - ShardSpec(dim=1).shard(da_ref, rank, tp)).abs().max().item(),
        "dB": (b.grad - db_ref).abs().max().item(),
        "A shape": float(tuple(a.shape) != (R, VOCAB // tp)),
    }
    if use_dora:
        errors["dm"] = (host.lora_magnitude_vector["default"].weight.grad - dm_ref[0]).abs().max().item()
    return errors, dict(fwd_bwd.calls), dict(finalize.calls), bool(a.tensor_model_parallel)


@pytest.mark.parametrize("tp,sp", [(2, False), (2, True)])
def test_vocab_parallel_embedding_tp2(pool2, tp, sp):
    _check(pool2.run(embedding_parity_job, tp, sp), tp, sp)


@pytest.mark.parametrize("sp", [False, True])
def test_vocab_parallel_embedding_tp4(pool4, sp):
    _check(pool4.run(embedding_parity_job, 4, sp), 4, sp)


def test_vocab_parallel_embedding_tp1(pool2):
    _check(pool2.run(embedding_parity_job, 1, False), 1, False)


@pytest.mark.parametrize("tp,sp", [(1, False), (2, False), (2, True)])
def test_dora_on_vocab_parallel_embedding(pool2, tp, sp):
    """DoRA's norms are partial over the table's row shards: they ride inside the embedding's one
    reduction (no collective added), m's gradient summed by finalize_grads only under SP."""
    _check(pool2.run(embedding_parity_job, tp, sp, True), tp, sp)


@pytest.mark.parametrize("sp", [False, True])
def test_dora_on_vocab_parallel_embedding_tp4(pool4, sp):
    _check(pool4.run(embedding_parity_job, 4, sp, True), 4, sp)


def _check(results, tp, sp):
    base = {} if tp == 1 else ({"reduce_scatter_tensor": 1, "all_gather_into_tensor": 1} if sp else {"all_reduce": 1})
    for rank, (errors, calls, finalize_calls, a_split) in enumerate(results):
        assert max(errors.values()) < TOL, f"rank {rank}: {errors}"
        assert calls == base, f"rank {rank}: the embedding's own collectives are {base}, got {calls}"
        assert finalize_calls == ({"all_reduce": 1} if tp > 1 else {}), f"rank {rank}: {finalize_calls}"
        assert a_split, "A is marked tensor-parallel like the table (gradient clipping counts each shard once)"
