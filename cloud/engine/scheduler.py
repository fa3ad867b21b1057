"""Which pending work runs in the next engine step: the `Scheduler` seam and its policies.

A step takes the pending work of every session at once (catch-up chunks of many rows, single-row
decode steps, speculative verifications, generate prompts and generate decode steps) up to
`max_batch_rows` real rows; work longer than what is left of that budget is split and continues
next step. A scheduler decides the order in which sessions get that budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from cloud.engine.requests import Chunk, Session


class Scheduler(Protocol):
    def schedule(self, pending: Sequence[Session], budget: int) -> list[Chunk]:
        """This step's chunks, at most `budget` real rows in all, from `pending` (the sessions
        with a job, in arrival order). A chunk takes the next rows of its session's job; the one
        that takes the job's last row is `final`."""
        ...


class SingleRowsFirst:
    """Single-row steps first, then the rest in arrival order: one long prompt never delays
    everyone else's next token."""

    def schedule(self, pending: Sequence[Session], budget: int) -> list[Chunk]:
        chunks = []
        # sorted() is stable: arrival order within each class.
        for session in sorted(pending, key=lambda s: s.job.pending_rows > 1):
            if budget == 0:
                break
            take = min(session.job.pending_rows, budget)
            chunks.append(Chunk(session, take, final=take == session.job.pending_rows))
            budget -= take
        return chunks
