"""What the engine keeps per request and per session: `Work` (the caller's handle), the queued
jobs, the sessions holding KV slots, and the chunks a step runs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from flow.sampling import Sampler
from flow.tier import TopK

if TYPE_CHECKING:
    from torch import Tensor


class Work:
    """One submitted request, finished by `Engine.step()` (or `cancel`/`close`).

    `done`, then `result` (a `Answer`, or the list of generated tokens) or `error`.
    `on_done(work)` is called once when it finishes; for generate work `on_token(token)` is called
    for each token as it is produced, before `on_done`. `session_id` is the session it runs on (a
    generation's own, unreachable through the session calls).
    """

    def __init__(self, kind: str, session_id: str, on_done: Callable[[Work], None] | None = None,
                 on_token: Callable[[int], None] | None = None):
        self.kind = kind  # "continue" or "generate"
        self.session_id = session_id
        self.on_done, self.on_token = on_done, on_token
        self.done = False
        self.result: Any = None
        self.error: Exception | None = None

    def __repr__(self) -> str:
        state = "error" if self.error is not None else "done" if self.done else "queued"
        return f"Work({self.kind}, {state})"


@dataclass(eq=False)
class ContinueJob:
    """A queued `continue`: hand-off rows for positions start .. start + n - 1."""

    work: Work
    hidden: Tensor  # (n, hidden) on the engine's device, in the family's dtype
    start: int
    return_all: bool
    top_k: int
    done_rows: int = 0  # rows already run (a request longer than a step's budget is split)
    tokens: list[int] = field(default_factory=list)
    best: list[TopK] = field(default_factory=list)
    handoff: list[np.ndarray] = field(default_factory=list)  # an edge's rows for the next tier
    scores: list[float] = field(default_factory=list)  # an edge's confidence per answered row

    @property
    def pending_rows(self) -> int:
        return len(self.hidden) - self.done_rows

    @property
    def next_position(self) -> int:
        return self.start + self.done_rows


@dataclass(eq=False)
class GenerateJob:
    """A whole-model generation: its tokens so far, of which the first `cached` have keys in the cache."""

    work: Work
    tokens: list[int]
    max_new_tokens: int
    sampler: Sampler
    stop_ids: frozenset[int]
    cached: int = 0
    new: list[int] = field(default_factory=list)

    @property
    def pending_rows(self) -> int:
        return len(self.tokens) - self.cached

    @property
    def next_position(self) -> int:
        return self.cached


@dataclass(eq=False)
class Session:
    """A holder of one KV slot: a continuation session, or a generation's private session."""

    id: str
    owner: str
    slot: int
    first_layer: int  # the first block it runs (0 for a generation, which starts at the embedding)
    generating: bool  # a generate's private session, not reachable through the session calls
    frontier: int = 0
    job: ContinueJob | GenerateJob | None = None
    last_used: float = 0.0  # clock time, for the TTL
    recency: int = 0  # a counter, for LRU order even when the clock is coarse


@dataclass(eq=False)
class Chunk:
    """The part of one session's job that runs in this step."""

    session: Session
    length: int
    final: bool  # the job's last row is in this chunk

    @property
    def job(self) -> ContinueJob | GenerateJob:
        return self.session.job

    @property
    def position(self) -> int:  # of its first row
        return self.job.next_position

    @property
    def answer_rows(self) -> range:
        """Rows of this chunk whose logits an answer needs."""
        if isinstance(self.job, ContinueJob) and self.job.return_all:
            return range(self.length)
        return range(self.length - 1, self.length) if self.final else range(0)
