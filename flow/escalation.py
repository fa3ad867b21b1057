"""One sequence's hand-off rows and the next tier's session for them (DESIGN.md §4).

Whoever stops at an exit — a device, or an edge tier forwarding to the cloud — keeps every
hand-off row by position and knows the next tier's frontier. `send` ships the rows the next tier
has not seen (catch-up plus the current ones) with `start == frontier`, in requests of at most the
session's `max_rows`, and repairs the two ways a session goes stale before giving up: a lost
session is reopened and replayed from position 0, a moved frontier is adopted. `TierUnavailable` is left to the caller, who decides between going on
alone and failing.
"""

from __future__ import annotations

import time

import numpy as np

from flow.tier import (
    Answer,
    FrontierMismatch,
    NextTier,
    SessionLost,
    TierError,
    TierSession,
    TierUnavailable,
)


class Escalation:
    """Pending hand-off rows of one sequence, and its session on the next tier."""

    def __init__(self, tier: NextTier, family_hash: str, from_exit: int, codec: str,
                 hidden_size: int, max_seq_len: int):
        self.tier, self.family_hash, self.from_exit, self.codec = tier, family_hash, from_exit, codec
        self.rows = np.zeros((max_seq_len, hidden_size), np.float32)  # h by position
        self.recorded = 0  # rows 0..recorded-1 are recorded
        self.session: TierSession | None = None
        self.frontier = 0  # positions the next tier holds, as far as we know
        self.rollback = False  # the next tier holds positions >= frontier that must go
        self.round_trips = self.bytes_sent = self.bytes_received = 0
        self.seconds = 0.0

    def record(self, start: int, rows: np.ndarray) -> None:
        """Rows for positions start.. (what the blocks up to our exit produced)."""
        self.rows[start:start + len(rows)] = rows
        self.recorded = start + len(rows)

    def keep(self, length: int) -> None:
        """Only positions 0..length-1 stand (a rejected draft): forget the rest on both sides."""
        self.recorded = min(self.recorded, length)
        if self.frontier > length:
            self.frontier, self.rollback = length, True

    def send(self, return_all: bool = False, top_k: int = 0) -> tuple[int, Answer]:
        """Ship rows frontier..recorded-1; returns (their first position, the answer).

        With `return_all` the answer holds a token (and top-k) for every position from the first
        one through recorded-1, however many requests it took.
        """
        began = time.perf_counter()
        first, tokens, best, answer = None, {}, {}, None
        try:
            while answer is None or self.frontier < self.recorded:
                start, answer = self._send_once(return_all, top_k)
                if answer.frontier <= start:
                    raise TierError(f"the next tier answered rows from {start} without moving its "
                                    f"frontier ({answer.frontier})")
                first = start if first is None else min(first, start)  # a replay starts over
                if return_all:
                    rows = range(start, answer.frontier)
                    tokens.update(zip(rows, answer.tokens, strict=True))
                    if answer.top_k:
                        best.update(zip(rows, answer.top_k, strict=True))
        finally:
            self.seconds += time.perf_counter() - began
        if return_all:
            answer.tokens = [tokens[p] for p in range(first, self.recorded)]
            answer.top_k = [best[p] for p in range(first, self.recorded)] if best else []
        return first, answer

    def _send_once(self, return_all: bool, top_k: int) -> tuple[int, Answer]:
        """One request: rows from the frontier, as many as the session takes at once."""
        for _ in range(3):  # a lost session or a moved frontier: repair, then retry at once
            try:
                if self.session is None:
                    self.session = self.tier.open(self.family_hash, self.from_exit, self.codec)
                    self.frontier, self.rollback = self.session.frontier, False
                start = self.frontier
                end = min(self.recorded, start + self.session.max_rows) if self.session.max_rows else self.recorded
                answer = self.session.continue_(start, self.rows[start:end], return_all, top_k,
                                                rollback=self.rollback)
                break
            except SessionLost:
                self.session = None  # replay from position 0 on a new session
            except FrontierMismatch as err:
                if err.frontier > self.recorded:
                    self.rollback = True  # it holds more than we know: discard the rest
                else:
                    self.frontier = err.frontier
        else:
            raise TierUnavailable("the next tier kept refusing this session's positions")
        self.frontier, self.rollback = answer.frontier, False
        self.round_trips += 1
        self.bytes_sent += answer.bytes_sent
        self.bytes_received += answer.bytes_received
        return start, answer

    def close(self) -> None:
        """End the next tier's session (best effort: it forgets idle sessions by itself)."""
        from flow.errors import FlowError

        if self.session is not None:
            try:
                self.session.close()
            except FlowError:
                pass
            self.session = None
