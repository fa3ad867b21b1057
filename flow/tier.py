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
from typing import Any, Protocol

import numpy as np

from flow.errors import FlowError

# The ways a device uses its next tier (DESIGN.md §4): its member alone; the tier settles the
# tokens the member is unsure of; the tier verifies runs of the member's drafts; the tier
# generates from token ids; per request, whichever of the two lossless ones (speculative,
# cloud) should be faster on the measured link.
MODES = ("local", "exit", "speculative", "cloud", "auto")


# ---- the protocol's errors -----------------------------------------------------------------
# Each travels as one gRPC status code (`flow.status` holds the table); a caller handles the
# in-process reference tier, a gRPC tier and an engine worker alike.


class TierError(FlowError):
    """The next tier refused or could not finish a request; the message says why."""


class InvalidRequest(TierError):
    """A malformed request: shapes, sizes, non-finite values, positions, exits, codecs."""


class TierUnavailable(TierError):
    """The next tier cannot serve now (network, restart, dead worker); retrying later may work."""


class Exhausted(TierUnavailable):
    """Over a capacity limit (no free or evictable KV slot, too many rows): back off, go on
    locally, retry later."""


class SessionLost(TierError):
    """The next tier no longer has this session (restart, eviction): open a new one and replay."""


class FrontierMismatch(TierError):
    """`start` was not the session's frontier; `frontier` is where the next tier stands."""

    def __init__(self, message: str, frontier: int):
        super().__init__(message)
        self.frontier = frontier


# ---- the session rules, for every implementation of a next tier ------------------------------


def integer(value: Any, what: str) -> int:
    """`value` as an int; `InvalidRequest` for anything else (bools and floats included)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise InvalidRequest(f"{what} must be an integer, got {value!r}")
    return int(value)


def first_block_after(config, from_exit: int) -> int:
    """The first backbone block a session continuing after member `from_exit` runs.

    `InvalidRequest` unless `from_exit` is a member with blocks after it: the last exit is the
    full model, and nothing continues it.
    """
    from_exit = integer(from_exit, "from_exit")
    if not 0 <= from_exit < config.last_exit:
        raise InvalidRequest(f"exit {from_exit} has nothing after it to continue: this family's "
                             f"exits are 0..{config.last_exit} and the last is the full model")
    return config.exits[from_exit] + 1


def check_start(frontier: int, start: int, rows: int, rollback: bool, context: int) -> int:
    """Where `rows` hand-off rows at `start` may go in a session standing at `frontier`.

    `start` must be the frontier, or, with `rollback`, any earlier position (the session first
    discards what lies at and after it); `FrontierMismatch` carries the frontier to resend from.
    The rows must fit in the session's `context` positions.
    """
    start = integer(start, "start")
    if start < 0:
        raise InvalidRequest(f"start must be >= 0, got {start}")
    if start > frontier or (start != frontier and not rollback):
        hint = " (a rollback can only go back)" if rollback else ""
        raise FrontierMismatch(f"start {start} is not the session's frontier {frontier}; send "
                               f"the rows from position {frontier}{hint}", frontier)
    if rows < 1:
        raise InvalidRequest("a continue request needs at least one hand-off row")
    if start + rows > context:
        raise InvalidRequest(f"positions {start}..{start + rows - 1} run past this tier's "
                             f"context of {context} positions per session")
    return start


def rolled_back(frontier: int, position: int) -> int:
    """The frontier after a rollback to `position`: it never moves forward, nor below 0."""
    return min(frontier, max(0, integer(position, "position")))


# ---- what travels -------------------------------------------------------------------------
# Each type converts itself to and from its `flow.v1` message (protobuf is imported only then,
# so the in-process tier needs none).


@dataclass
class TopK:
    """The k most likely next tokens at one row and their logits, most likely first."""

    ids: list[int]
    logits: list[float]

    def to_pb(self):
        from flow.v1 import tier_pb2

        return tier_pb2.TopK(ids=self.ids, logits=self.logits)

    @classmethod
    def from_pb(cls, message) -> TopK:
        return cls(list(message.ids), list(message.logits))


@dataclass
class Answer:
    """The next tier's answer to one `continue_` request."""

    tokens: list[int]  # greedy next token per returned row (the last row, or every row)
    frontier: int  # the session's frontier after the request
    # The tier that settled the tokens ("cloud", "edge", ...); "" until the server that answers
    # stamps its own name (an edge passes on the name of the tier it forwarded to).
    tier: str = ""
    top_k: list[TopK] = field(default_factory=list)  # per returned row, when asked for
    bytes_sent: int = 0  # request payload bytes (hand-off rows as encoded)
    bytes_received: int = 0
    # An edge engine's extras (not on the wire): the rows after its exit block for the next tier,
    # and its exit's confidence at each returned row.
    handoff: np.ndarray | None = None
    scores: list[float] = field(default_factory=list)

    def to_pb(self, tier: str = ""):
        """The `ContinueResponse`, naming `tier` unless a tier's name is already stamped."""
        from flow.v1 import tier_pb2

        return tier_pb2.ContinueResponse(tokens=self.tokens, frontier=self.frontier,
                                         tier=self.tier or tier,
                                         top_k=[best.to_pb() for best in self.top_k])

    @classmethod
    def from_pb(cls, message, bytes_sent: int = 0) -> Answer:
        return cls(list(message.tokens), int(message.frontier), message.tier,
                   [TopK.from_pb(best) for best in message.top_k], bytes_sent, message.ByteSize())


@dataclass
class SamplingParams:
    """How to pick a token from logits: greedy when temperature is 0."""

    temperature: float = 0.0
    top_k: int = 0  # 0 = no limit
    top_p: float = 1.0
    seed: int | None = None

    def to_pb(self):
        from flow.v1 import tier_pb2

        return tier_pb2.Sampling(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                                 seed=self.seed)

    @classmethod
    def from_pb(cls, message) -> SamplingParams:
        """An unset `top_p` (0 on the wire) is 1.0: no nucleus cut."""
        return cls(message.temperature, message.top_k, message.top_p or 1.0,
                   message.seed if message.HasField("seed") else None)


class TierSession(Protocol):
    """One sequence's state on the next tier."""

    session_id: str
    frontier: int
    max_rows: int  # the most hand-off rows one `continue_` may carry; 0 = no limit

    def continue_(self, start: int, rows: np.ndarray, return_all: bool = False, top_k: int = 0,
                  rollback: bool = False) -> Answer:
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
