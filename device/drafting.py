"""How many tokens a speculative round drafts: a fixed number, or as many as pay on this link.

A round of `speculative` mode drafts k tokens on the device (k member steps of `device_step_s`
each) and sends their rows in one verification request (`round_trip_s`: the wire both ways and
the tier's work). The tier keeps the longest agreeing prefix and adds its own next token, so if
each draft is accepted with probability `acceptance` given the ones before it were, a round
settles E(k) = 1 + a + a^2 + ... + a^k tokens in T(k) = k * device_step_s + round_trip_s
seconds. `AdaptiveDraft` estimates the three from the rounds it has seen (recent rounds weigh
more) and drafts up to the k that maximises E(k) / T(k) — long drafts where a round trip is
dear, short ones where it is cheap or drafts are often wrong — and within a round stops early
once the member is unsure: the next draft is kept only if all before it and itself are
accepted, which the member's own probabilities estimate, and it is worth drafting only while
that chance times the time one settled token costs exceeds the device step it takes. Output is
the full model's either way: every draft is verified.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flow.confidence import confidence

ADAPTIVE = "adaptive"
MAX_DRAFT = 16  # the longest draft an adaptive round makes
_DECAY = 0.85  # weight of the past against the latest round, per round


class FixedDraft:
    """Always `tokens` drafts per round."""

    def __init__(self, tokens: int):
        self.tokens = tokens

    def cap(self) -> int:
        return self.tokens

    def keep_drafting(self, chance: float) -> bool:
        return True

    def observe(self, drafts: int, accepted: int, device_s: float, round_s: float) -> None:
        pass

    def __repr__(self) -> str:
        return f"FixedDraft({self.tokens})"


@dataclass
class AdaptiveDraft:
    """Drafts sized from measured acceptance, device step time and round-trip time.

    Before any round is measured it drafts `initial` tokens. `observe` takes each verified
    round; `cap` and `keep_drafting` read the estimates.
    """

    initial: int = 4
    _accepted: float = 0.0  # decayed count of accepted drafts
    _trials: float = 0.0  # decayed count of drafts judged (accepted, or the first rejected)
    device_step_s: float | None = None
    round_trip_s: float | None = None

    @property
    def acceptance(self) -> float:
        """P(a draft is accepted | every draft before it in its round was); even odds a priori."""
        return (self._accepted + 1.0) / (self._trials + 2.0)

    def observe(self, drafts: int, accepted: int, device_s: float, round_s: float) -> None:
        """A verified round: `accepted` of `drafts` drafts kept; `device_s` the device's drafting
        time, `round_s` the verification request's."""
        judged = accepted + (accepted < drafts)  # drafts after the first rejection are not judged
        self._accepted = _DECAY * self._accepted + accepted
        self._trials = _DECAY * self._trials + judged
        step = device_s / max(drafts, 1)
        self.device_step_s = _blend(self.device_step_s, step)
        self.round_trip_s = _blend(self.round_trip_s, round_s)

    def cap(self) -> int:
        """The draft length that settles the most tokens per second by the estimates."""
        if self.round_trip_s is None:
            return self.initial
        return max(range(1, MAX_DRAFT + 1), key=self.tokens_per_second)

    def tokens_per_second(self, drafts: int) -> float:
        """E(k) / T(k) of a round of `drafts` drafts, by the current estimates."""
        a = min(self.acceptance, 1 - 1e-9)
        settled = (1 - a ** (drafts + 1)) / (1 - a)
        return settled / (drafts * self.device_step_s + self.round_trip_s)

    def keep_drafting(self, chance: float) -> bool:
        """Whether one more draft pays: `chance` is the member's estimate that it and every draft
        before it in this round are accepted."""
        if self.round_trip_s is None:
            return True
        seconds_per_token = 1.0 / self.tokens_per_second(self.cap())
        return chance * seconds_per_token >= self.device_step_s


def draft_policy(tokens: int | str) -> FixedDraft | AdaptiveDraft:
    """The drafting of `DeviceClient(draft_tokens=...)`: a positive count, or "adaptive"."""
    from flow.errors import ConfigError

    if tokens == ADAPTIVE:
        return AdaptiveDraft()
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ConfigError(f"draft_tokens must be a positive integer or {ADAPTIVE!r}, got {tokens!r}")
    return FixedDraft(tokens)


def top_probability(logits: np.ndarray) -> float:
    """The probability of the most likely token under `logits` (vocab,)."""
    return float(confidence(logits, "max_prob"))


def _blend(estimate: float | None, observed: float) -> float:
    return observed if estimate is None else _DECAY * estimate + (1 - _DECAY) * observed
