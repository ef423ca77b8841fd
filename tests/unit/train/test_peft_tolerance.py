"""train.finish.peft_tolerance: how far PEFT may be from the Megatron logits.  Reference: float32
rounding grows with the logits' scale (1e-5 of the largest logit, never under 1e-4); a bfloat16
base gets 5% of the largest logit."""
import pytest
import torch

from parallel_adapters.train.finish import peft_tolerance

F32, BF16 = {torch.float32}, {torch.bfloat16}


@pytest.mark.parametrize("largest, expected", [(0.5, 1e-4), (3.0, 1e-4), (10.0, 1e-4), (38.0, 3.8e-4)])
def test_float32_base_allows_1e_4_or_1e_5_of_the_largest_logit(largest, expected):
    logits = torch.tensor([[0.1, -largest, 0.2]])
    assert peft_tolerance(logits, F32) == pytest.approx(expected)
    assert peft_tolerance(logits, {torch.float32, torch.float64}) == pytest.approx(expected)


def test_bfloat16_base_allows_5_percent_of_the_largest_logit():
    assert peft_tolerance(torch.tensor([0.3, -0.5]), BF16) == pytest.approx(0.05)
    assert peft_tolerance(torch.tensor([0.3, 38.0]), BF16 | F32) == pytest.approx(1.9)
