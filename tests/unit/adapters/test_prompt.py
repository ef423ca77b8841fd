"""Prompt tuning's pure parts (adapters/prompt.py, PromptTuningConfig).

Oracle: transformers' causal-LM loss on PEFT's extended labels, computed here by hand with
shift-by-one and ignore_index=-100; explicit slices for the sequence-parallel row replacement."""
import pytest
import torch
import torch.nn.functional as F

from parallel_adapters.adapters.prompt import causal_lm_loss, extend_labels, init_token_ids, replace_virtual_rows
from parallel_adapters.config import PromptTuningConfig


def test_loss_is_transformers_loss_on_peft_labels():
    g = torch.Generator().manual_seed(0)
    n, labels = 3, torch.randint(0, 7, (2, 5), generator=g)
    labels[1, :2] = -100
    logits = torch.randn(2, n + 5, 7, generator=g, dtype=torch.float64)
    extended = extend_labels(labels, n)
    assert extended[:, :n].eq(-100).all() and torch.equal(extended[:, n:], labels)
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), extended[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(causal_lm_loss(logits, labels, n), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("chunks", [1, 2, 3])
def test_row_replacement_covers_virtual_positions_in_every_chunk(chunks):
    n, s, b, h = 5, 12, 2, 4  # equal chunks, as sequence parallelism splits
    full = torch.randn(s, b, h, dtype=torch.float64)
    prompt = torch.randn(n, h, dtype=torch.float64)
    pieces = [replace_virtual_rows(c, prompt, i) for i, c in enumerate(full.chunk(chunks))]
    out = torch.cat(pieces)
    torch.testing.assert_close(out[:n], prompt.unsqueeze(1).expand(n, b, h))
    torch.testing.assert_close(out[n:], full[n:])


def test_text_ids_are_cut_or_repeated_as_peft():
    config = PromptTuningConfig(num_virtual_tokens=5, prompt_tuning_init="TEXT", init_token_ids=[4, 7])
    assert init_token_ids(config, 10).tolist() == [4, 7, 4, 7, 4]
    assert init_token_ids(config.replace(init_token_ids=list(range(8))), 10).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        init_token_ids(config.replace(init_token_ids=[12]), 10)
    with pytest.raises(ValueError, match="init_token_ids to the tokenised"):
        init_token_ids(PromptTuningConfig(num_virtual_tokens=5, prompt_tuning_init="TEXT",
                                          prompt_tuning_init_text="hi"), 10)


@pytest.mark.parametrize("fields,name", [({"num_virtual_tokens": 0}, "num_virtual_tokens"),
                                         ({"prompt_tuning_init": "ZEROS"}, "prompt_tuning_init"),
                                         ({"prompt_tuning_init": "TEXT"}, "prompt_tuning_init_text"),
                                         ({"task_type": "SEQ_2_SEQ_LM"}, "CAUSAL_LM")])
def test_config_errors_name_the_field(fields, name):
    with pytest.raises(ValueError, match=name):
        PromptTuningConfig(**fields)


def test_config_round_trips():
    config = PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="TEXT", prompt_tuning_init_text="a b",
                                init_token_ids=[1, 2])
    assert PromptTuningConfig.from_dict(config.to_dict()) == config


class _TinyGPT(torch.nn.Module):
    """The shape of a GPT stage that prompt tuning hooks: `embedding(input_ids=...)` -> [s, b, H]."""

    class Embedding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.word_embeddings = torch.nn.Embedding(10, 4)
            self.config = type("Config", (), {"sequence_parallel": False})()

        def forward(self, input_ids, position_ids=None):
            return self.word_embeddings(input_ids).transpose(0, 1)

    def __init__(self):
        super().__init__()
        self.embedding = self.Embedding()
        self.vocab_size = 10

    def forward(self, input_ids):
        return self.embedding(input_ids=input_ids, position_ids=None)


def test_disable_set_and_unload_switch_the_virtual_tokens_off():
    from parallel_adapters import ParallelGroups, get_adapter_model

    model = _TinyGPT()
    ids = torch.tensor([[1, 2, 3]])
    base = model(ids)
    adapter = get_adapter_model(model, PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="SAMPLE_VOCAB"),
                                groups=ParallelGroups.single())
    prompted = adapter(ids)
    assert prompted.shape == (5, 1, 4) and model.prepended_tokens == 2
    torch.testing.assert_close(prompted[2:], base)
    torch.testing.assert_close(prompted[:2, 0], adapter.model.prompt_tuning.prompt_embeddings["default"].weight)
    assert [n for n, p in adapter.named_parameters() if p.requires_grad] == [
        "model.prompt_tuning.prompt_embeddings.default.weight"]
    with adapter.disable_adapter():
        torch.testing.assert_close(adapter(ids), base)
        assert model.prepended_tokens == 0
    with pytest.raises(ValueError, match="cannot merge prompt adapter"):
        adapter.merge_adapter()
    plain = adapter.unload()
    torch.testing.assert_close(plain(ids), base)
    assert not hasattr(plain, "prompt_tuning") and plain.prepended_tokens == 0
