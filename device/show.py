"""A generation on a terminal: each token coloured by the tier that settled it, and a summary.

`flow generate` and the two-tier example print generations the same way: device tokens plain,
the next tier's bold blue, tokens settled offline (the tier unreachable) yellow, then one line of
what the generation cost.
"""

from __future__ import annotations

import sys
from typing import TextIO

# ANSI colours per kind of token.
COLOURS = {"device": "", "offline": "\033[33m", "tier": "\033[1;34m"}
RESET = "\033[0m"


def write_steps(generation, prompt: str, colour: bool, out: TextIO = sys.stdout) -> None:
    """Stream `prompt` and then each step's text as it arrives (coloured when `colour`)."""
    out.write(prompt)
    for step in generation:
        kind = "offline" if step.offline else ("device" if step.tier == "device" else "tier")
        code = COLOURS[kind] if colour else ""
        out.write(f"{code}{step.text}{RESET if code else ''}")
        out.flush()
    out.write("\n")


def summary(generation, tiers: list[str] | None = None) -> str:
    """One line: tokens, device share, round trips, bytes, latency, speed, drafts, finish."""
    tiers = tiers if tiers is not None else generation.tiers
    count, device = len(tiers), tiers.count("device")
    offline = sum(generation.offline)
    timings = generation.timings
    parts = [f"{count} tokens", f"device {device / max(count, 1):.0%}",
             f"{generation.round_trips} round trips", f"{generation.bytes_sent / 1024:.1f} KiB sent",
             f"first token {1000 * timings['first_token_s']:.0f} ms",
             f"{count / max(timings['total_s'], 1e-9):.1f} tok/s", f"finish: {generation.finish_reason}"]
    verified = generation.drafts_accepted + generation.drafts_rejected
    if verified:
        parts.append(f"drafts {generation.drafts_accepted}/{verified} accepted")
    if offline:
        parts.append(f"{offline} offline")
    return " · ".join(parts)
