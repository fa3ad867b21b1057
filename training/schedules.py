"""Learning-rate and exit-loss-weight schedules, pure functions of the step.

Loss = Σ_k λ_k(step) · CE_k. The last exit (the full backbone) always has its configured weight;
early exits follow the schedule:
- constant: λ_k = w_k;
- warmup:   λ_k ramps linearly from 0 to w_k over `exit_loss.warmup_steps` (the backbone learns
            first, then the exits phase in);
- decay:    λ_k falls linearly from w_k to `decay_to · w_k` over the run (early exits matter most
            at the start, the deep model at the end).
"""

from __future__ import annotations

import math

from training.config import TrainConfig, TrainSection


def learning_rate(train: TrainSection, step: int) -> float:
    """Linear warm-up to `lr`, then cosine decay to `min_lr` at `steps`."""
    if train.warmup_steps and step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    span = max(1, train.steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / span)
    return train.min_lr + 0.5 * (train.lr - train.min_lr) * (1 + math.cos(math.pi * progress))


def exit_loss_weights(config: TrainConfig, num_exits: int, step: int) -> list[float]:
    weights = config.exit_weights(num_exits)
    schedule = config.exit_loss
    if schedule.schedule == "warmup":
        factor = min(1.0, step / schedule.warmup_steps) if schedule.warmup_steps else 1.0
    elif schedule.schedule == "decay":
        progress = min(1.0, step / max(1, config.train.steps - 1))
        factor = 1.0 - (1.0 - schedule.decay_to) * progress
    else:
        factor = 1.0
    return [w * factor for w in weights[:-1]] + [weights[-1]]
