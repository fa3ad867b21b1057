"""`InProcessEngineClient`: the engine on a thread of the serving process, behind coroutines.

`cloud.engine.core.Engine` is a plain steppable class and not thread-safe. `EngineThread` owns it:
the gRPC front end (asyncio) posts commands into a queue, and the engine thread runs them between
`step()`s, so an engine step never blocks the event loop and no lock is held across one. Results
come back to the loop through `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np

from cloud.engine.core import Engine
from flow.tier import Answer, SamplingParams

_IDLE_WAIT_S = 0.5  # how often an idle engine thread wakes to expire idle sessions
_NOTHING = object()


class EngineThread:
    """Runs commands and engine steps on one dedicated thread."""

    def __init__(self, engine: Engine, on_step: Callable[[int, float], None] | None = None):
        self.engine = engine
        self.on_step = on_step  # (rows, seconds) of every step, for metrics
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="flow-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._commands.put(None)
        self._thread.join(timeout)

    def post(self, command: Callable[[], Any], loop: asyncio.AbstractEventLoop) -> asyncio.Future:
        """Run `command()` on the engine thread; a future of its result on `loop`."""
        future = loop.create_future()
        self._commands.put((command, future, loop))
        return future

    def _run(self) -> None:
        while True:
            # Block for a command only while there is nothing to step.
            try:
                item = self._commands.get_nowait() if self.engine.has_work() else \
                    self._commands.get(timeout=_IDLE_WAIT_S)
            except queue.Empty:
                item = _NOTHING
            while item is not _NOTHING:  # run every queued command before the next step
                if item is None:
                    return
                self._execute(*item)
                try:
                    item = self._commands.get_nowait()
                except queue.Empty:
                    item = _NOTHING
            if self.engine.has_work():
                began = time.perf_counter()
                rows = self.engine.step()
                if self.on_step is not None:
                    self.on_step(rows, time.perf_counter() - began)
            else:
                self.engine.expire_idle()

    @staticmethod
    def _execute(command, future: asyncio.Future, loop: asyncio.AbstractEventLoop) -> None:
        try:
            result = command()
        except Exception as err:  # noqa: BLE001 - handed to the caller, who maps it to a status
            loop.call_soon_threadsafe(_settle, future, None, err)
        else:
            loop.call_soon_threadsafe(_settle, future, result, None)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller went away (cancelled)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class InProcessEngineClient:
    """The `EngineClient` of an `Engine` run by an `EngineThread` in this process."""

    def __init__(self, engine: Engine, on_step: Callable[[int, float], None] | None = None):
        self.engine = engine
        self.thread = EngineThread(engine, on_step)

    async def start(self) -> None:
        self.thread.start()

    async def stop(self) -> None:
        await asyncio.to_thread(self.thread.stop)

    async def _call(self, fn: Callable, *args, **kwargs):
        loop = asyncio.get_running_loop()
        return await self.thread.post(lambda: fn(*args, **kwargs), loop)

    async def _submit(self, fn: Callable, *args, **kwargs):
        """Queue work with the engine. A caller cancelled before the engine took it withdraws
        it (else a continuation would hold its session and refuse the caller's retry, and a
        generation its slot): not submitted at all if the engine has not come to it yet, else
        cancelled by a command queued right behind it."""
        loop = asyncio.get_running_loop()
        taken: dict[str, Any] = {}  # shared with the engine thread; dict updates are atomic

        def submit():
            if taken.get("abandoned"):
                return None
            taken["work"] = fn(*args, **kwargs)
            return taken["work"]

        try:
            return await self.thread.post(submit, loop)
        except asyncio.CancelledError:
            taken["abandoned"] = True
            self.thread.post(lambda: "work" in taken and self.engine.cancel(taken["work"]), loop)
            raise

    async def open_session(self, owner: str, from_exit: int) -> tuple[str, int]:
        return await self._call(self.engine.open_session, owner, from_exit)

    async def continue_(self, session_id: str, owner: str, start: int, rows: np.ndarray,
                        return_all: bool, top_k: int, rollback: bool) -> Answer:
        loop = asyncio.get_running_loop()
        finished = loop.create_future()
        on_done = lambda work: loop.call_soon_threadsafe(_settle, finished, work, None)  # noqa: E731
        work = await self._submit(self.engine.submit_continue, session_id, owner, start, rows,
                                  return_all=return_all, top_k=top_k, rollback=rollback,
                                  on_done=on_done)
        try:
            work = await finished
        except asyncio.CancelledError:
            await self._call(self.engine.cancel, work)
            raise
        if work.error is not None:
            raise work.error
        return work.result

    async def rollback(self, session_id: str, owner: str, position: int) -> int:
        return await self._call(self.engine.rollback, session_id, owner, position)

    async def close(self, session_id: str, owner: str) -> None:
        await self._call(self.engine.close, session_id, owner)

    async def generate(self, owner: str, token_ids: list[int], max_new_tokens: int,
                       sampling: SamplingParams,
                       stop_ids: tuple[int, ...]) -> AsyncIterator[int]:
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue = asyncio.Queue()
        on_token = lambda token: loop.call_soon_threadsafe(tokens.put_nowait, token)  # noqa: E731
        on_done = lambda work: loop.call_soon_threadsafe(tokens.put_nowait, work)  # noqa: E731
        work = await self._submit(self.engine.submit_generate, owner, token_ids, max_new_tokens,
                                  sampling, stop_ids, on_token=on_token, on_done=on_done)
        try:
            while True:
                item = await tokens.get()
                if isinstance(item, int):
                    yield item
                    continue
                if item.error is not None:
                    raise item.error
                return
        finally:
            if not work.done:  # the caller stopped listening: free the slot
                await self._call(self.engine.cancel, work)

    async def ended_sessions(self) -> list[str]:
        return await self._call(self.engine.ended_sessions)

    async def stats(self) -> dict:
        return await self._call(self.engine.stats)
