"""Picking the next token from logits: greedy, or temperature / top-k / top-p sampling (numpy).

Shared by the device SDK and the tiers' `cloud` mode so that one seed gives one sequence whoever
samples. Sampling can also run on a truncated distribution (the next tier's top-k logits).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from flow.errors import ConfigError
from flow.tier import SamplingParams


def check_sampling(params: SamplingParams) -> SamplingParams:
    """`params` if valid, else `ConfigError` saying which value is wrong."""
    if not (np.isfinite(params.temperature) and params.temperature >= 0):  # NaN fails both
        raise ConfigError(f"temperature must be a finite number >= 0 (0 = greedy), "
                          f"got {params.temperature}")
    if not float(params.top_k).is_integer() or params.top_k < 0:  # NaN / inf / 2.5 too
        raise ConfigError(f"top_k must be an integer >= 0 (0 = no limit), got {params.top_k}")
    if not 0 < params.top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {params.top_p}")
    return params


class Sampler:
    """Draws tokens with one random stream, so a seed reproduces a whole generation."""

    def __init__(self, params: SamplingParams | None = None):
        self.params = check_sampling(params or SamplingParams())
        self.rng = np.random.default_rng(self.params.seed)

    @property
    def greedy(self) -> bool:
        return self.params.temperature == 0

    def pick(self, logits: np.ndarray, ids: Sequence[int] | None = None) -> int:
        """A token from `logits` (vocab,), or from a truncated distribution over `ids`."""
        logits = np.asarray(logits, dtype=np.float64)
        candidates = np.arange(len(logits)) if ids is None else np.asarray(ids)
        if self.greedy:
            return int(candidates[int(np.argmax(logits))])
        order = np.argsort(-logits, kind="stable")
        if self.params.top_k:
            order = order[:int(self.params.top_k)]
        scaled = logits[order] / self.params.temperature
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        if self.params.top_p < 1:
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            keep = int(np.searchsorted(np.cumsum(probs), self.params.top_p) + 1)
            probs = probs[:keep] / probs[:keep].sum()
            order = order[:keep]
        return int(candidates[order[self.rng.choice(len(order), p=probs)]])
