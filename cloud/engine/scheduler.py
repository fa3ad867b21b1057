"""Which pending work runs in the next engine step, and in which forwards.

A step takes the pending work of every session at once (catch-up chunks of many rows, single-row
decode steps, speculative verifications, generate prompts and generate decode steps) up to
`max_batch_rows` real rows; work longer than what is left of that budget is split and continues
next step. A scheduler (the `Scheduler` seam) decides the order in which sessions get that budget;
`forwards` splits the step's chunks into the forwards that run them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
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


# A forward pads every chunk to its longest; a chunk that would make the forward compute more than
# this many positions per real row starts a forward of its own. Each forward costs a pass over the
# weights, so a decode step's single rows and a speculative draft's few share one, while a prompt
# of 64 tokens among 31 decode rows runs apart (together: 32 x 64 positions for 95 real rows).
MAX_PADDING_FACTOR = 2


def forwards(chunks: Sequence[Chunk]) -> Iterator[tuple[int, bool, list[Chunk]]]:
    """The step's chunks as forwards: (first block, generating, chunks), one kind of session per
    forward (they start at different blocks, or from tokens rather than rows), shortest chunks
    first, each forward computing at most MAX_PADDING_FACTOR positions per real row."""
    kinds: dict[tuple[int, bool], list[Chunk]] = {}
    for chunk in chunks:
        kinds.setdefault((chunk.session.first_layer, chunk.session.generating), []).append(chunk)
    for (first, generating), kind in sorted(kinds.items()):
        group: list[Chunk] = []
        real = 0
        for chunk in sorted(kind, key=lambda c: c.length):  # the last chunk added is the longest
            if group and (len(group) + 1) * chunk.length > MAX_PADDING_FACTOR * (real + chunk.length):
                yield first, generating, group
                group, real = [], 0
            group.append(chunk)
            real += chunk.length
        yield first, generating, group
