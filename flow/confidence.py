"""How sure an exit is of its next token: the policies of `exit` mode (DESIGN.md §4), numpy only.

Each policy maps a row of logits to a score where larger means more confident, and a token is
accepted on the device when `score >= threshold`:

- `max_prob`: the top-1 probability (threshold in (0, 1]);
- `margin`: top-1 minus top-2 probability (threshold in [0, 1]);
- `entropy`: minus the entropy in nats (accept when entropy <= -threshold; thresholds are <= 0,
  `flow calibrate` picks them like the others).

`ExitPolicy` (a policy and its threshold) is the one rule the device's `exit` mode, an edge tier
and `flow calibrate` apply.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flow.errors import ConfigError

POLICIES = ("max_prob", "margin", "entropy")
DEFAULT_POLICY = "max_prob"
# The threshold of each policy when neither the caller nor a calibration gives one.
DEFAULT_THRESHOLDS = {"max_prob": 0.8, "margin": 0.5, "entropy": -1.0}


def probabilities(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def confidence(logits: np.ndarray, policy: str) -> np.ndarray:
    """Scores (...,) for logits (..., vocab) under `policy`; larger = more confident."""
    probs = probabilities(logits)
    if policy == "max_prob":
        return probs.max(axis=-1)
    if policy == "margin":
        top2 = np.partition(probs, -2, axis=-1)[..., -2:]
        return top2[..., 1] - top2[..., 0]
    if policy == "entropy":
        return (probs * np.log(np.clip(probs, 1e-30, None))).sum(axis=-1)  # = -entropy
    raise ConfigError(f"unknown confidence policy {policy!r}; choose one of {', '.join(POLICIES)}")


@dataclass(frozen=True)
class ExitPolicy:
    """When an exit settles a token itself: its `policy` score reaches `threshold`.

    `threshold` None takes the policy's default (`DEFAULT_THRESHOLDS`). Any finite threshold is
    allowed: above every possible score (say 1.5 for `max_prob`) escalates every token, below
    every score accepts every token. A bad policy or threshold is a `ConfigError`.
    """

    policy: str = DEFAULT_POLICY
    threshold: float | None = None

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(f"unknown confidence policy {self.policy!r}; choose one of "
                              f"{', '.join(POLICIES)}")
        threshold = DEFAULT_THRESHOLDS[self.policy] if self.threshold is None else self.threshold
        if isinstance(threshold, bool) or not isinstance(threshold, int | float | np.floating) \
                or not np.isfinite(threshold):
            raise ConfigError(f"the {self.policy} threshold must be a finite number, got {threshold!r}")
        object.__setattr__(self, "threshold", float(threshold))

    def scores(self, logits: np.ndarray) -> np.ndarray:
        """Confidence (...,) of logits (..., vocab); larger = surer."""
        return confidence(logits, self.policy)

    def accepts(self, logits: np.ndarray) -> np.ndarray:
        """Whether the exit settles each row (..., vocab) itself."""
        return self.scores(logits) >= self.threshold
