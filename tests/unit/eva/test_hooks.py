"""EVA's input capture (eva/hooks.py): rows are kept until the end of the forward, so rows that
share memory with a layer's input must be copied before the model edits that input in place.
Reference: the same run with a prepare_layer_inputs_fn that copies."""
from __future__ import annotations

import torch
from torch import nn

from parallel_adapters import ParallelGroups, get_adapter_model
from parallel_adapters.eva.initialize import get_eva_layer_states
from tests.distributed.eva_jobs import gap_table, lora_config, token_batches


class EditsInPlace(nn.Module):
    """`first`'s input is zeroed in place after `first` has run."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(256, 32)
        self.emb.weight.data.copy_(gap_table(3, 0.6))
        self.first, self.second = nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, input_ids, attention_mask=None):
        x = self.emb(input_ids) * 1.0
        y = self.first(x)
        x.mul_(0.0)
        return self.second(y + x)


def test_rows_that_view_the_input_are_copied_before_the_forward_goes_on():
    batches = token_batches(6, batch=4, seq=16)
    states = {}
    for how, fn in (("view", lambda args, mask, name: args[0].reshape(-1, 32)),
                    ("copy", lambda args, mask, name: args[0].reshape(-1, 32).clone())):
        model = get_adapter_model(EditsInPlace(), lora_config(("first", "second"), r=2), groups=ParallelGroups.single())
        states[how] = get_eva_layer_states(model, batches, prepare_layer_inputs_fn=fn, show_progress_bar=False)
    view, copy = states["view"]["first"], states["copy"]["first"]
    assert view.rank > 0 and float(view.singular_values[0]) > 1.0
    torch.testing.assert_close(view.components, copy.components, atol=0, rtol=0)
