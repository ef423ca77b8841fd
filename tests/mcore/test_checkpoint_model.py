"""save_checkpoint / load_checkpoint on a Megatron GPT with adapters, on real gloo ranks.

Oracle: the model that was saved.  A TP=2 save loads at TP=1, 2 and 4 with bitwise-equal fp32
adapter tensors and the same outputs (bitwise at the same TP size; fp32 rounding across sizes),
and a resumed optimizer continues bit-exactly.
"""
import pytest
import torch
import torch.distributed as dist

from tests.mcore.test_lora_gpt import _batch, _loss

TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]


def _model(tp, lora_seed):
    from parallel_adapters import LoraConfig, get_adapter_model
    from parallel_adapters.mcore import cpu
    from parallel_adapters.mcore.compat import initialize_model_parallel
    from parallel_adapters.mcore.gpt import GPTSettings, build_gpt

    cpu.enable_cpu_mode()
    initialize_model_parallel(tp, 1)
    cpu.model_parallel_seed(1234)
    base = build_gpt(GPTSettings(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=8,
                                 num_query_groups=4, vocab_size=100))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, seed=lora_seed)
    model = get_adapter_model(base, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, optimizer


def _step(model, optimizer):
    input_ids, labels = _batch()
    optimizer.zero_grad()
    loss = _loss(model.model, input_ids, labels)
    loss.backward()
    model.finalize_grads()
    optimizer.step()
    return loss.item()


def _full_adapter_tensors(model):
    out = {}
    for name, st in model.adapter_state_dict().items():
        pieces = [torch.empty_like(st.local) for _ in range(model.groups.tp_size)]
        if model.groups.tp_size > 1:
            dist.all_gather(pieces, st.local.contiguous(), group=model.groups.tp_group)
        else:
            pieces = [st.local.clone()]
        out[name] = st.spec.unshard(pieces)
    return out


def _logits(model):
    from parallel_adapters.mcore.gpt import gpt_logits

    with torch.no_grad():
        return gpt_logits(model.model, _batch()[0])


def save_job(directory):
    from parallel_adapters.checkpoint.adapter_io import save_checkpoint

    model, optimizer = _model(2, lora_seed=0)
    _step(model, optimizer)
    save_checkpoint(model, f"{directory}/step-1", optimizer, extra_state={"step": 1})
    saved = (_logits(model), _full_adapter_tensors(model))
    second_loss = _step(model, optimizer)
    return saved, second_loss, _full_adapter_tensors(model)


def load_job(directory, tp, resume):
    from parallel_adapters.checkpoint.adapter_io import load_checkpoint

    model, optimizer = _model(tp, lora_seed=99)  # different adapters before loading
    extra = load_checkpoint(model, f"{directory}/step-1", optimizer if resume else None)
    loaded = (_logits(model), _full_adapter_tensors(model))
    if not resume:
        return loaded, extra
    return loaded, extra, _step(model, optimizer), _full_adapter_tensors(model)


@pytest.fixture(scope="module")
def saved_tp2(pool2, tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("ckpt"))
    return directory, pool2.run(save_job, directory)[0]


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tp2_checkpoint_loads_at_any_tp(request, saved_tp2, tp):
    directory, ((saved_logits, saved_tensors), _, _) = saved_tp2
    pool = request.getfixturevalue("pool4" if tp == 4 else "pool2")
    for (logits, tensors), extra in pool.run(load_job, directory, tp, False):
        assert extra == {"step": 1}
        assert tensors.keys() == saved_tensors.keys()
        for name, tensor in tensors.items():
            assert torch.equal(tensor, saved_tensors[name]), name
        if tp == 2:
            assert torch.equal(logits, saved_logits)
        else:
            torch.testing.assert_close(logits, saved_logits, atol=1e-5, rtol=1e-5)


def test_resume_continues_bit_exactly(pool2, saved_tp2):
    directory, (_, second_loss, after_second) = saved_tp2
    for _, extra, loss, tensors in pool2.run(load_job, directory, 2, True):
        assert loss == second_loss
        for name, tensor in tensors.items():
            assert torch.equal(tensor, after_second[name]), name
