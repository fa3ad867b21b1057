"""`EngineClient`: what the gRPC front end (`cloud.server.TierService`) asks of an engine.

Three implementations, so the front end never knows where its engine runs:
`cloud.engine.in_process.InProcessEngineClient` (an engine on a thread of this process),
`cloud.engine.multiprocess.MultiprocessEngineClient` (engines in worker processes behind
ZeroMQ), and `cloud.edge.EdgeEngineClient` (either of them, forwarding to the next tier when its
exit is not confident).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

import numpy as np

from flow.tier import Answer, SamplingParams


class EngineClient(Protocol):
    """The engine of one tier, used from the front end's event loop.

    Every call is a coroutine (`generate` an async iterator) that may run concurrently with the
    others; none blocks the event loop for an engine step. A refusal raises the protocol's error
    from `flow.tier` (`InvalidRequest`, `SessionLost`, `FrontierMismatch`, `Exhausted`,
    `TierUnavailable`, `TierError`), which the front end answers with its status code
    (`flow.status`); a refusal raises the same error type whichever implementation runs it
    (worker processes add `TierUnavailable` for a worker that died with the call).

    Sessions are bound to the `owner` that opened them: to any other owner a session reads as
    unknown (`SessionLost`), and `close` of another's session does nothing. A session takes one
    `continue_` at a time (`InvalidRequest` while one is queued). Cancelling the task awaiting a
    `continue_`, or leaving a `generate` iterator before its end, withdraws the work from the
    engine (a generation's slot is freed at once). `start` finishes before any other call and
    `stop` comes after the last one (the server stops taking calls first).
    """

    async def start(self) -> None:
        """Make the engine ready to serve (its thread runs, its workers have joined)."""
        ...

    async def stop(self) -> None:
        """Stop the engine and release what it holds (threads, worker processes, sockets)."""
        ...

    async def open_session(self, owner: str, from_exit: int) -> tuple[str, int]:
        """A new session continuing after member `from_exit`: (session id, frontier 0)."""
        ...

    async def continue_(self, session_id: str, owner: str, start: int, rows: np.ndarray,
                        return_all: bool, top_k: int, rollback: bool) -> Answer:
        """Run hand-off rows (n, hidden) float32 for positions start.. of a session, as
        `Engine.submit_continue` does; the answer's `tier` is left for the server to stamp."""
        ...

    async def rollback(self, session_id: str, owner: str, position: int) -> int:
        """Discard the session's positions >= `position`; returns its frontier."""
        ...

    async def close(self, session_id: str, owner: str) -> None:
        """End the session and free its slot; idempotent."""
        ...

    def generate(self, owner: str, token_ids: list[int], max_new_tokens: int,
                 sampling: SamplingParams, stop_ids: tuple[int, ...]) -> AsyncIterator[int]:
        """The whole model from token ids: each new token as it is made, as
        `Engine.submit_generate` runs it."""
        ...

    async def ended_sessions(self) -> list[str]:
        """The ids of the sessions the engine ended on its own (evicted for room, or expired)
        since the last call: what a wrapper keeping per-session state (an edge) drops."""
        ...

    async def stats(self) -> dict:
        """The engine's counters (`Engine.stats` names, summed over workers), for metrics."""
        ...
