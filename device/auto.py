"""`auto` mode: per request, the lossless mode that should finish it sooner on this link.

Both `speculative` and `cloud` give the full model's greedy output; which is faster depends on
the link and the tier. `cloud` pays one round trip before its first token, then the tier's time
per token; `speculative` pays a round trip per run of drafts. `ModeChooser` keeps, per mode, the
measured time to the first token and time per later token of the generations this client ran
(recent ones weigh more) and picks the mode whose estimate for the request's length is lower;
a mode never measured is tried once first. A sampled request (temperature > 0) goes to `cloud`:
speculative verification is greedy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

LOSSLESS = ("speculative", "cloud")
_DECAY = 0.7  # weight of the past against the latest generation


@dataclass
class _Rates:
    first_token_s: float
    per_token_s: float


@dataclass
class ModeChooser:
    """Measured rates of the lossless modes, and the choice they imply."""

    rates: dict[str, _Rates] = field(default_factory=dict)

    def choose(self, max_new_tokens: int, greedy: bool) -> str:
        if not greedy:
            return "cloud"
        for mode in LOSSLESS:
            if mode not in self.rates:
                return mode  # measure every mode once
        return min(LOSSLESS, key=lambda mode: self.expected_s(mode, max_new_tokens))

    def expected_s(self, mode: str, tokens: int) -> float:
        rates = self.rates[mode]
        return rates.first_token_s + (tokens - 1) * rates.per_token_s

    def observe(self, mode: str, first_token_s: float, total_s: float, tokens: int) -> None:
        """A finished generation of `mode` that settled `tokens` tokens (none offline)."""
        if mode not in LOSSLESS or tokens < 2:
            return
        seen = _Rates(first_token_s, (total_s - first_token_s) / (tokens - 1))
        before = self.rates.get(mode)
        self.rates[mode] = seen if before is None else _Rates(
            _DECAY * before.first_token_s + (1 - _DECAY) * seen.first_token_s,
            _DECAY * before.per_token_s + (1 - _DECAY) * seen.per_token_s)
