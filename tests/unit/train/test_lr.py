"""LR schedules: closed-form values at the warmup/decay boundaries (reference: the formulas in
train/lr.py's docstring, transformers' convention of reaching min_lr one step past the end)."""
import math

import pytest

from parallel_adapters.train.lr import LRSchedule, set_lr


def test_constant_with_warmup():
    s = LRSchedule(lr=1.0, total_steps=10, schedule="constant", warmup_steps=3)
    assert [s(i) for i in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert s(9) == 1.0


def test_linear_and_cosine_decay():
    lin = LRSchedule(lr=2.0, total_steps=12, schedule="linear", warmup_steps=2)
    cos = LRSchedule(lr=2.0, total_steps=12, schedule="cosine", warmup_steps=2, min_lr=0.2)
    assert lin(2) == pytest.approx(2.0) and lin(7) == pytest.approx(1.0) and lin(11) == pytest.approx(0.2)
    assert cos(2) == pytest.approx(2.0) and cos(7) == pytest.approx(1.1)  # halfway: mean of lr and min_lr
    assert cos(11) == pytest.approx(0.2 + 1.8 * 0.5 * (1 + math.cos(math.pi * 0.9)))
    values = [cos(i) for i in range(2, 12)]
    assert all(a >= b for a, b in zip(values, values[1:])) and min(values) > 0.2


def test_no_warmup_starts_at_lr_and_last_step_still_learns():
    for kind in ("constant", "linear", "cosine"):
        s = LRSchedule(lr=0.1, total_steps=5, schedule=kind)
        assert s(0) == pytest.approx(0.1) and s(4) > 0


@pytest.mark.parametrize("kwargs,field", [
    ({"schedule": "exponential"}, "optim.schedule"), ({"lr": 0.0}, "optim.lr"), ({"total_steps": 0}, "optim.steps"),
    ({"warmup_steps": 11}, "optim.warmup_steps"), ({"min_lr": 2.0}, "min_lr"),
])
def test_invalid_settings_name_the_key(kwargs, field):
    args = {"lr": 1.0, "total_steps": 10, **kwargs}
    with pytest.raises(ValueError, match=field):
        LRSchedule(**args)
    with pytest.raises(ValueError, match="step"):
        LRSchedule(lr=1.0, total_steps=3)(-1)


def test_set_lr_writes_every_group():
    groups = [{"lr": 0.0}, {"lr": 5.0, "weight_decay": 0.1}]
    set_lr(groups, 0.3)
    assert [g["lr"] for g in groups] == [0.3, 0.3] and groups[1]["weight_decay"] == 0.1
