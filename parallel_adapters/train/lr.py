"""Learning-rate schedules: constant, linear or cosine decay after a linear warmup.

A schedule is a pure function of the optimizer step, so exact resume needs to save only the step:
there is no scheduler object whose hidden state could drift from the checkpoint.  The loop writes
`lr_at(step)` into every parameter group before each optimizer step, which works the same for a
plain torch optimizer and for DeepSpeed's ZeRO optimizer wrappers (their `param_groups` are the
wrapped optimizer's).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class LRSchedule:
    """lr(step) for steps 0 .. total_steps-1.

    Warmup: lr rises linearly from lr / (warmup_steps + 1) to lr over the first warmup_steps steps
    (never exactly 0: a zero-lr first step would be a wasted step).  Then "constant" keeps lr,
    "linear" decays linearly and "cosine" along half a cosine towards min_lr, reached at
    step == total_steps (one past the last step, as in transformers' schedules, so the last
    step still learns).
    """

    lr: float
    total_steps: int
    schedule: str = "constant"
    warmup_steps: int = 0
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {list(SCHEDULES)}, got {self.schedule!r}")
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr!r}")
        if self.total_steps < 1:
            raise ValueError(f"optim.steps must be >= 1, got {self.total_steps!r}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"optim.warmup_steps must be in [0, optim.steps={self.total_steps}], "
                             f"got {self.warmup_steps!r}")
        if not 0.0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr must be in [0, lr], got {self.min_lr!r}")

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"learning-rate schedule: step must be >= 0, got {step}")
        if step < self.warmup_steps:
            return self.lr * (step + 1) / (self.warmup_steps + 1)
        if self.schedule == "constant":
            return self.lr
        decay_steps = self.total_steps - self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, decay_steps))
        if self.schedule == "linear":
            factor = 1.0 - progress
        else:
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr + (self.lr - self.min_lr) * factor


def set_lr(param_groups: list[dict], lr: float) -> None:
    """Write `lr` into every parameter group (torch optimizers and ZeRO wrappers alike)."""
    for group in param_groups:
        group["lr"] = lr
