"""An edge tier: blocks up to exit J, answering when exit J is confident, else asking the cloud.

`flow serve FAMILY --from-exit K --to-exit J --next HOST:PORT` chains tiers (device → edge →
cloud, the AI Flow hierarchy). The edge's engine runs blocks `e_K+1 .. e_J` and exit J's branch
and hands back the rows after block `e_J`; per session the edge keeps those rows and its own
session on the next tier (`flow.escalation.Escalation`, the same bookkeeping a device uses),
under the session's owner and id, so a caller naming another identity's session id reaches
nothing of it here either:

- `exit` mode (the device wants the next token at the last row): if exit J's confidence passes
  the policy the edge answers with exit J's token; otherwise it sends the next tier every row it
  has not seen (catch-up + current) and answers with the next tier's token.
- `speculative` verification (a token for every row) must be the full model's: the edge always
  forwards, and answers with the next tier's tokens for the device's rows.
- A rollback from the device rolls back the edge's engine (the engine does it on `rollback=True`)
  and the edge's rows on the next tier (on its next request there).

- A whole-model generation (`cloud` mode) goes on to the next tier, whose tokens stream back
  through the edge: devices reach every mode through the tier they are given.

When the next tier is unreachable an `exit`-mode answer falls back to exit J's own token (it is
still a better token than the device's); a verification answers UNAVAILABLE, so the device goes
on with its drafts offline.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator

import numpy as np

from cloud.engine.client import EngineClient
from flow.confidence import ExitPolicy
from flow.escalation import Escalation
from flow.tier import Answer, NextTier, SamplingParams, SessionLost, TierUnavailable


class EdgeEngineClient:
    """The `EngineClient` of an edge: `inner` (an engine client whose engine stops at exit
    `to_exit`) answering when `exit_policy` accepts its exit, else `next_tier` answering.

    Sessions on the next tier continue after `to_exit`, for the family `family_hash` of
    `hidden_size` and `max_seq_len`, with hand-off rows sent in `codec`.
    """

    def __init__(self, inner: EngineClient, next_tier: NextTier, exit_policy: ExitPolicy,
                 family_hash: str, to_exit: int, hidden_size: int, max_seq_len: int,
                 codec: str = "fp32"):
        self.inner, self.next_tier, self.exit_policy = inner, next_tier, exit_policy
        self.family_hash, self.to_exit, self.codec = family_hash, to_exit, codec
        self.hidden_size, self.max_seq_len = hidden_size, max_seq_len
        # by (owner, session id): the inner engine answers only a session's owner, and so does this
        self._escalations: dict[tuple[str, str], Escalation] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    async def start(self) -> None:
        await self.inner.start()

    async def stop(self) -> None:
        await self.inner.stop()

    async def open_session(self, owner: str, from_exit: int) -> tuple[str, int]:
        opened = await self.inner.open_session(owner, from_exit)
        await self._forget_ended()
        return opened

    async def continue_(self, session_id: str, owner: str, start: int, rows: np.ndarray,
                        return_all: bool, top_k: int, rollback: bool) -> Answer:
        key = (owner, session_id)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:  # one request at a time per session: the rows and frontier are shared
            try:
                answer = await self.inner.continue_(session_id, owner, start, rows,
                                                    return_all=return_all, top_k=top_k,
                                                    rollback=rollback)
            except SessionLost:  # evicted or expired here: its rows upstream are stale too
                await self._close_upstream(self._forget(key))
                raise
            escalation = self._escalation(key)
            escalation.keep(start)  # what the device discarded (rollback) is gone here too
            escalation.record(start, answer.handoff)
            if not return_all and answer.scores[-1] >= self.exit_policy.threshold:
                return answer
            try:
                first, forwarded = await asyncio.to_thread(escalation.send, return_all, top_k)
            except TierUnavailable:
                if return_all:
                    raise  # a verification must be the full model's: the device goes offline
                return answer  # exit J's own token beats the device's
            # the next tier answered for rows first..; the device asked about rows start..
            skip = start - first if return_all else 0
            return Answer(forwarded.tokens[skip:], answer.frontier, forwarded.tier,
                                forwarded.top_k[skip:] if return_all else forwarded.top_k)

    async def rollback(self, session_id: str, owner: str, position: int) -> int:
        # The rows on the next tier follow on the session's next continue (`Escalation.keep`).
        return await self.inner.rollback(session_id, owner, position)

    async def close(self, session_id: str, owner: str) -> None:
        await self.inner.close(session_id, owner)
        await self._close_upstream(self._forget((owner, session_id)))

    async def generate(self, owner: str, token_ids: list[int], max_new_tokens: int,
                       sampling: SamplingParams, stop_ids: tuple[int, ...]) -> AsyncIterator[int]:
        # The edge holds only its blocks: the next tier runs the whole model. Its client is
        # blocking, so a thread reads the stream; leaving early stops the thread at its next token.
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def put(item) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
                loop.call_soon_threadsafe(tokens.put_nowait, item)

        def read() -> None:
            try:
                for token in self.next_tier.generate(token_ids, max_new_tokens, sampling,
                                                     stop_ids, family_hash=self.family_hash):
                    if stop.is_set():
                        return
                    put(token)
                put(None)
            except Exception as err:  # noqa: BLE001 - raised to the caller, who maps it
                put(err)

        threading.Thread(target=read, name="flow-edge-generate", daemon=True).start()
        try:
            while (item := await tokens.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            stop.set()

    async def ended_sessions(self) -> list[str]:
        return await self._forget_ended()

    async def stats(self) -> dict:
        return await self.inner.stats()

    def _escalation(self, key: tuple[str, str]) -> Escalation:
        if key not in self._escalations:
            self._escalations[key] = Escalation(
                self.next_tier, self.family_hash, self.to_exit, self.codec, self.hidden_size,
                self.max_seq_len)
        return self._escalations[key]

    def _forget(self, key: tuple[str, str]) -> Escalation | None:
        """Drop the state of (owner, session id), if any; returns its escalation."""
        self._locks.pop(key, None)
        return self._escalations.pop(key, None)

    async def _forget_ended(self) -> list[str]:
        """Drop the state of the sessions the inner engine ended on its own (evicted, expired):
        an abandoned session would otherwise hold its rows here, and its session on the next
        tier, for ever. Returns their ids."""
        ended = set(await self.inner.ended_sessions())
        for key in [key for key in self._locks if key[1] in ended]:
            if not self._locks[key].locked():  # a request in flight finds SessionLost itself
                await self._close_upstream(self._forget(key))
        return sorted(ended)

    @staticmethod
    async def _close_upstream(escalation: Escalation | None) -> None:
        if escalation is not None:
            await asyncio.to_thread(escalation.close)
