"""Prefix tuning's pure pieces: PEFT's table layout (columns of each layer / TP rank, against
PEFT's own view + permute in get_prompt), the attention mask and the config's checks."""
import pytest
import torch

from parallel_adapters.adapters.prefix_encoder import layer_columns
from parallel_adapters.config import PrefixTuningConfig
from parallel_adapters.mcore.prefix_attention import prefix_mask, prepend_prefix


@pytest.mark.parametrize("tp", [1, 2])
def test_layer_columns_follow_peft_past_key_values_layout(tp):
    n, layers, heads, head_dim = 3, 2, 4, 5
    table = torch.randn(n, layers * 2 * heads * head_dim)
    # PEFT's get_prompt: view [b, n, 2L, heads, d], permute to [2L, b, heads, n, d], split in pairs (K, V)
    past = table.view(1, n, 2 * layers, heads, head_dim).permute(2, 0, 3, 1, 4).split(2)
    for layer in range(layers):
        for rank in range(tp):
            cols = table[:, layer_columns(layer, heads * head_dim, tp, rank)].view(n, 2, heads // tp, head_dim)
            mine = slice(rank * heads // tp, (rank + 1) * heads // tp)
            torch.testing.assert_close(cols[:, 0], past[layer][0, 0, mine].transpose(0, 1), rtol=0, atol=0)
            torch.testing.assert_close(cols[:, 1], past[layer][1, 0, mine].transpose(0, 1), rtol=0, atol=0)


def test_mask_opens_the_prefix_and_keeps_the_real_tokens_causal():
    mask = prefix_mask(None, 3, 2, torch.device("cpu"))
    assert mask.tolist() == [[False, False, False, True, True], [False, False, False, False, True],
                             [False, False, False, False, False]]
    given = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    assert prefix_mask(given, 3, 2, torch.device("cpu"))[..., :2].any().item() is False


def test_prepend_prefix_puts_keys_then_values_first_for_every_sequence():
    key, value = torch.zeros(4, 2, 3, 5), torch.ones(4, 2, 3, 5)
    prefix = torch.arange(2 * 2 * 15, dtype=torch.float32).view(2, 2, 15)
    k, v = prepend_prefix(key, value, prefix)
    assert k.shape == v.shape == (6, 2, 3, 5)
    torch.testing.assert_close(k[:2, 1], prefix[:, 0].view(2, 3, 5))
    torch.testing.assert_close(v[:2, 0], prefix[:, 1].view(2, 3, 5))
    with pytest.raises(ValueError, match="3 KV groups x head_dim 5"):
        prepend_prefix(key, value, prefix[..., :10])


def test_config_checks_name_the_field():
    with pytest.raises(ValueError, match="PrefixTuningConfig.init_weights"):
        PrefixTuningConfig(init_weights="gaussian")
    with pytest.raises(ValueError, match="PrefixTuningConfig.num_virtual_tokens"):
        PrefixTuningConfig(num_virtual_tokens=0)
    with pytest.raises(ValueError, match="task_type='CAUSAL_LM'"):
        PrefixTuningConfig(task_type="SEQ_2_SEQ_LM")
    config = PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=8)
    assert PrefixTuningConfig.from_dict(config.to_dict()) == config
