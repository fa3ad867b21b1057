"""How sure an exit is of its next token: the policies of `exit` mode (DESIGN.md §4), numpy only.

Each policy maps a row of logits to a score where larger means more confident, and a token is
accepted on the device when `score >= threshold`:

- `max_prob`: the top-1 probability (threshold in (0, 1]);
- `margin`: top-1 minus top-2 probability (threshold in [0, 1]);
- `entropy`: minus the entropy in nats (accept when entropy <= -threshold; thresholds are <= 0,
  `flow calibrate` picks them like the others).
"""

from __future__ import annotations

import numpy as np

from flow.errors import ConfigError

POLICIES = ("max_prob", "margin", "entropy")


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


def check_threshold(policy: str, threshold: float) -> float:
    """`threshold` as a float if `policy` is known and the threshold is finite, else `ConfigError`.

    Any finite value is allowed: above every possible score (say 1.5 for `max_prob`) escalates
    every token, below every score accepts every token.
    """
    if policy not in POLICIES:
        raise ConfigError(f"unknown confidence policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if not np.isfinite(threshold):
        raise ConfigError(f"the {policy} threshold must be a finite number, got {threshold}")
    return float(threshold)
