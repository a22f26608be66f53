"""The learning rate of each training step, as a pure function (docs/design.md#the-loss).

    lr(step) = lr * (step + 1) / warmup      step < warmup
             = lr * f(p)                     after, p = (step - warmup) / (total_steps - 1 - warmup)

with f = 1 (constant), 1 - (1 - min_ratio) * p (linear) or
min_ratio + (1 - min_ratio) * (1 + cos(pi * p)) / 2 (cosine), so the last step of the run
trains at lr * min_ratio (or at lr, constant). The step is the coordinator's training step, not
an optimizer-step count: a step whose groups were all dropped does not shift the schedule, and
a resumed run needs no scheduler state.
"""
from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine")


def learning_rate(step: int, *, lr: float, total_steps: int, warmup_steps: int = 0, schedule: str = "constant",
                  min_ratio: float = 0.0) -> float:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    decay_steps = total_steps - 1 - warmup_steps
    progress = min(1.0, (step - warmup_steps) / decay_steps) if decay_steps > 0 else 1.0
    if schedule == "linear":
        return lr * (1.0 - (1.0 - min_ratio) * progress)
    return lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))
