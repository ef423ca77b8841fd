"""EVA's entry points take PEFT's arguments with PEFT's meanings, and get_eva_state_dict returns
PEFT's form.  References: PEFT 0.21.2's own input-preparation functions passed as custom ones
(they must select exactly what our defaults select), the per-rank record `get_eva_layer_states`,
and explicit custom functions that do what a `None` means in PEFT.
"""
from __future__ import annotations

import copy

import pytest
import torch
from peft.tuners.lora import eva as peft_eva
from torch import nn

from parallel_adapters import ParallelGroups, get_adapter_model
from parallel_adapters.eva.initialize import get_eva_layer_states, get_eva_state_dict, initialize_eva_weights
from tests.distributed.eva_jobs import Block, lora_config, token_batches

BATCHES = token_batches(12, batch=4, seq=32, labels=True)


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _tensor_batches(n=16):
    g = torch.Generator().manual_seed(3)
    mix = torch.linalg.qr(torch.randn(8, 8, generator=g)).Q
    scales = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.12, 0.06])
    return [(torch.randn(32, 8, generator=g) * scales) @ mix for _ in range(n)]


def _mlp_model():
    return get_adapter_model(_MLP(), lora_config(("fc1", "fc2"), r=2), groups=ParallelGroups.single())


def _same_states(a, b):
    assert set(a) == set(b)
    for name in a:
        assert a[name].rank == b[name].rank, name
        torch.testing.assert_close(a[name].components, b[name].components, atol=0, rtol=0, msg=name)


def test_tensor_batches_with_no_model_preparation():
    """PEFT's None: the batch itself reaches prepare_layer_inputs_fn; None there too: every row."""
    seen = []

    def rows(layer_input, model_input, name):
        seen.append((type(layer_input), model_input, name))
        return layer_input[0].reshape(-1, layer_input[0].shape[-1])

    batches = _tensor_batches()
    custom = get_eva_layer_states(_mlp_model(), batches, forward_fn=lambda m, x: m(x), prepare_model_inputs_fn=None,
                                  prepare_layer_inputs_fn=rows, show_progress_bar=False)
    assert seen[0][0] is tuple and seen[0][1] is batches[0] and {s[2] for s in seen} == {"fc1", "fc2"}
    plain = get_eva_layer_states(_mlp_model(), batches, prepare_model_inputs_fn=None, prepare_layer_inputs_fn=None,
                                 show_progress_bar=False)  # default forward: model(batch) for a tensor
    _same_states(custom, plain)
    assert all(s.rank > 0 for s in plain.values())


def test_layer_function_dict_by_peft_or_our_names():
    batches = _tensor_batches()
    kw = dict(prepare_model_inputs_fn=None, show_progress_bar=False)
    flat = get_eva_layer_states(_mlp_model(), batches, prepare_layer_inputs_fn=None, **kw)
    half = lambda args, model_input, name: args[0][::2]  # noqa: E731  (every other row)
    for key in ("fc1", "base_model.model.fc1"):
        mixed = get_eva_layer_states(_mlp_model(), batches, prepare_layer_inputs_fn={key: half}, **kw)
        assert torch.equal(mixed["fc2"].components, flat["fc2"].components)  # not named: None, every row
        assert not torch.equal(mixed["fc1"].components, flat["fc1"].components)
    with pytest.raises(ValueError, match=r"not EVA targets: \['fc3'\]"):
        get_eva_layer_states(_mlp_model(), batches, prepare_layer_inputs_fn={"fc3": half}, **kw)


def test_peft_preparation_functions_select_what_our_defaults_select():
    """PEFT's language-modeling functions, passed as custom ones, give the same statistics; our
    model preparation hands a custom layer function PEFT's token indices."""
    base = Block()
    ours = get_eva_layer_states(get_adapter_model(copy.deepcopy(base), lora_config(), groups=ParallelGroups.single()),
                                BATCHES, show_progress_bar=False)
    theirs = get_eva_layer_states(
        get_adapter_model(copy.deepcopy(base), lora_config(), groups=ParallelGroups.single()), BATCHES,
        prepare_model_inputs_fn=peft_eva.prepare_model_inputs_fn_language_modeling,
        prepare_layer_inputs_fn=peft_eva.prepare_layer_inputs_fn_language_modeling, show_progress_bar=False)
    _same_states(ours, theirs)
    mixed = get_eva_layer_states(get_adapter_model(copy.deepcopy(base), lora_config(), groups=ParallelGroups.single()),
                                 BATCHES, prepare_layer_inputs_fn=peft_eva.prepare_layer_inputs_fn_language_modeling,
                                 show_progress_bar=False)
    _same_states(ours, mixed)


def test_state_dict_is_peft_form_and_initialises_like_the_layer_states():
    base = Block()
    model = get_adapter_model(copy.deepcopy(base), lora_config(), groups=ParallelGroups.single())
    states = get_eva_layer_states(model, BATCHES, show_progress_bar=False)
    peft_form = get_eva_state_dict(model, BATCHES, show_progress_bar=False)
    assert set(peft_form) == {f"base_model.model.{n}" for n in states}
    for name, s in states.items():
        assert isinstance(peft_form[f"base_model.model.{name}"], torch.Tensor)
        torch.testing.assert_close(peft_form[f"base_model.model.{name}"], s.components, atol=0, rtol=0)
    initialize_eva_weights(model, eva_state_dict=peft_form)
    other = get_adapter_model(copy.deepcopy(base), lora_config(), groups=ParallelGroups.single())
    initialize_eva_weights(other, eva_state_dict=states)
    assert model.peft_config["default"] == other.peft_config["default"]
    for (_, a), (_, b) in zip(model.adapter_layers(), other.adapter_layers()):
        assert a.lora_alpha["default"] == pytest.approx(b.lora_alpha["default"])
        assert torch.equal(a.lora_A["default"].weight, b.lora_A["default"].weight)


def test_default_preparation_on_tensor_batches_says_what_to_pass():
    with pytest.raises(ValueError, match="prepare_model_inputs_fn=None"):
        get_eva_state_dict(_mlp_model(), _tensor_batches(), show_progress_bar=False)
