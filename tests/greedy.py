"""Greedy reference generations and the exactness checks of DESIGN.md §4 (near ties counted),
for every mode and for speculative bookkeeping."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Top-1 minus top-2 logit below this is a near tie: ONNX Runtime vs PyTorch rounding may flip it.
NEAR_TIE = 1e-4


@dataclass(frozen=True)
class NearTie:
    """A position where the output took a token within NEAR_TIE of the reference's top-1."""

    prompt: tuple[int, ...]
    index: int  # of the generated token
    gap: float  # reference top-1 logit minus the logit of the token the output took


def greedy(family, exit: int, prompt: list[int], count: int) -> list[int]:
    """The reference model's greedy continuation at `exit` (full recompute: independent of caches)."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(count):
            tokens.append(int(family.logits(tokens, exit=exit)[0, -1].argmax()))
    return tokens[len(prompt):]


def expected_length(family, prompt: list[int], max_new_tokens: int) -> int:
    """How many tokens a request for `max_new_tokens` (EOS ignored) must produce: all of them,
    unless the context ends first."""
    return min(max_new_tokens, family.config.max_seq_len - len(prompt))


def check_same_greedy(family, exit: int, prompt: list[int], got: list[int],
                      max_new_tokens: int) -> list[NearTie]:
    """Assert that `got` is the reference's greedy output at `exit` for a request of
    `max_new_tokens` tokens; return the near ties it passed.

    The length comes from the request, so an empty or truncated output fails. Each token is
    checked against the reference's prediction given the output's own prefix (teacher-forced, one
    forward pass): by induction every token equal to that prediction means the whole output is
    the reference's greedy output. Where the output took another token whose reference logit is
    within NEAR_TIE of the top (float noise may decide such ties), the position is counted and
    the check goes on; anywhere else it fails.
    """
    length = expected_length(family, prompt, max_new_tokens)
    assert len(got) == length, (f"the output has {len(got)} tokens; the request asked for "
                                f"{length} (prompt {prompt})")
    with torch.no_grad():
        logits = family.logits(list(prompt) + list(got), exit=exit)[0].float()
    predictions = logits[len(prompt) - 1:len(prompt) - 1 + len(got)]  # (len(got), vocab)
    near_ties = []
    for i, (token, row) in enumerate(zip(got, predictions, strict=True)):
        best = int(row.argmax())
        if token != best:
            gap = float(row[best] - row[token])
            assert gap < NEAR_TIE, (f"token {i} is {token}, the reference's is {best}, whose logit "
                                    f"beats it by {gap:.2e}; prompt {prompt}")
            near_ties.append(NearTie(tuple(prompt), i, gap))
    return near_ties


def check_speculative(family, prompt, result, max_new_tokens) -> list:
    """One speculative result: the full model's output, and its bookkeeping adds up. Returns
    its near ties."""
    near_ties = check_same_greedy(family, family.config.last_exit, prompt, result.tokens,
                                  max_new_tokens)
    assert not any(result.offline)
    # every accepted draft is a token the device settled; every round settles its accepted drafts
    # plus the tier's token (which the last round drops when its drafts filled max_new_tokens)
    assert result.tiers.count("device") == result.drafts_accepted
    surplus = result.drafts_accepted + result.round_trips - len(result.tokens)
    assert surplus in (0, 1), (result.drafts_accepted, result.round_trips, len(result.tokens))
    return near_ties


def check_drafts_were_accepted_and_rejected(results) -> None:
    """Across `results`, drafts were accepted and rejected, and rounds settled more than one
    token on average (fewer round trips than tokens)."""
    accepted = sum(r.drafts_accepted for r in results)
    rejected = sum(r.drafts_rejected for r in results)
    tokens = sum(len(r.tokens) for r in results)
    trips = sum(r.round_trips for r in results)
    assert accepted > 0 and rejected > 0, (accepted, rejected)
    assert trips < tokens, (trips, tokens)
