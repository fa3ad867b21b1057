"""What a tier asks of the next tier (DESIGN.md §4), independent of the transport.

A device (or an edge) that stops at exit e talks to the next tier through a `NextTier`: it opens
a `TierSession` for its family and exit, then sends `continue_` requests carrying `start` (which
must equal the session's frontier) and the pending hand-off rows `h_e` for positions
`start .. start + n - 1`. The next tier runs its blocks on them, extends its KV cache to
`start + n`, and answers with tokens: for the last row (`exit` mode) or for every row
(`speculative` verification). `cloud` mode sends token ids only (`generate`).

`flow.tier_client.GrpcTier` implements this protocol over gRPC; `flow.reference_tier.ReferenceTier`
runs the reference model in process and is what tests and `flow generate --cloud local` use.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from flow.errors import FlowError


class TierError(FlowError):
    """The next tier refused a request; the message says why and what to change."""


class TierUnavailable(TierError):
    """The next tier cannot be reached (network, restart, dead worker); retrying later may work."""


class SessionLost(TierError):
    """The next tier no longer has this session (restart, eviction): open a new one and replay."""


class FrontierMismatch(TierError):
    """`start` was not the session's frontier; `frontier` is where the next tier stands."""

    def __init__(self, message: str, frontier: int):
        super().__init__(message)
        self.frontier = frontier


@dataclass
class TopK:
    """The k most likely next tokens at one row and their logits, most likely first."""

    ids: list[int]
    logits: list[float]


@dataclass
class Continuation:
    """The next tier's answer to one `continue_` request."""

    tokens: list[int]  # greedy next token per returned row (the last row, or every row)
    frontier: int  # the session's frontier after the request
    tier: str  # name of the tier that settled the tokens ("cloud", "edge", ...)
    top_k: list[TopK] = field(default_factory=list)  # per returned row, when asked for
    bytes_sent: int = 0  # request payload bytes (hand-off rows as encoded)
    bytes_received: int = 0
    # An edge engine's extras (not on the wire): the rows after its exit block for the next tier,
    # and its exit's confidence at each returned row.
    handoff: np.ndarray | None = None
    scores: list[float] = field(default_factory=list)


@dataclass
class SamplingParams:
    """How to pick a token from logits: greedy when temperature is 0."""

    temperature: float = 0.0
    top_k: int = 0  # 0 = no limit
    top_p: float = 1.0
    seed: int | None = None


class TierSession(Protocol):
    """One sequence's state on the next tier."""

    session_id: str
    frontier: int

    def continue_(self, start: int, rows: np.ndarray, return_all: bool = False, top_k: int = 0,
                  rollback: bool = False) -> Continuation:
        """Run the next tier on hand-off rows (n, hidden) at positions start.. .

        `rollback=True` first discards the session's positions >= start (a rejected speculative
        draft); otherwise `start` must equal the frontier (`FrontierMismatch`).
        """
        ...

    def rollback(self, position: int) -> int:
        """Discard positions >= position; returns the new frontier."""
        ...

    def close(self) -> None: ...


class NextTier(Protocol):
    """A connection to the next tier."""

    name: str

    def open(self, family_hash: str, from_exit: int, codec: str = "fp32") -> TierSession:
        """Open a session continuing after member `from_exit` of the family with `family_hash`.

        Raises `flow.errors.HashMismatchError` if the tier serves another family.
        """
        ...

    def generate(self, token_ids: list[int], max_new_tokens: int,
                 sampling: SamplingParams | None = None, stop_ids: tuple[int, ...] = (),
                 family_hash: str = "") -> Iterator[int]:
        """`cloud` mode: the whole model from token ids, streamed token by token.

        A non-empty `family_hash` must be the served family's (`HashMismatchError` otherwise).
        """
        ...
