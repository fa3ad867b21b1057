"""`InProcessEngineClient`: the engine on a thread of the serving process, behind coroutines.

`cloud.engine.core.Engine` is a plain steppable class and not thread-safe. `EngineThread` owns it:
the gRPC front end (asyncio) posts commands into a queue, and the engine thread runs them between
`step()`s, so an engine step never blocks the event loop and no lock is held across one.

What comes back to the event loop (a command's result, an answer, a generated token) is held by
the engine thread until it has run every queued command or finished a step, and then handed to
the loop in one `call_soon_threadsafe`: the loop wakes once per engine step, not once per
answer, and does not contend for the GIL with the step that is still producing answers. A
request costs one hop each way: its submission is posted without waiting for the engine to
accept it, and a refusal at submission comes back the same way an answer does.
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
    """Runs commands and engine steps on one dedicated thread, and hands what they produce back
    to event loops in batches (`reply`)."""

    def __init__(self, engine: Engine, on_step: Callable[[int, float], None] | None = None):
        self.engine = engine
        self.on_step = on_step  # (rows, seconds) of every step, for metrics
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._replies: dict[asyncio.AbstractEventLoop, list[tuple[Callable, tuple]]] = {}
        self._thread = threading.Thread(target=self._run, name="flow-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._commands.put(None)
        self._thread.join(timeout)

    def post(self, command: Callable[[], Any]) -> None:
        """Run `command()` on the engine thread, in the order posted; it reports back itself,
        through `reply`."""
        self._commands.put(command)

    def call(self, command: Callable[[], Any], loop: asyncio.AbstractEventLoop) -> asyncio.Future:
        """Run `command()` on the engine thread; a future of its result (or error) on `loop`."""
        future = loop.create_future()

        def run():
            try:
                result = command()
            except Exception as err:  # noqa: BLE001 - handed to the caller, who maps it to a status
                self.reply(loop, _settle, future, None, err)
            else:
                self.reply(loop, _settle, future, result, None)

        self.post(run)
        return future

    def reply(self, loop: asyncio.AbstractEventLoop, callback: Callable, *args) -> None:
        """Run `callback(*args)` on `loop` (engine thread only): held until this round of
        commands or this step is over, then sent with the others in one wake-up."""
        self._replies.setdefault(loop, []).append((callback, args))

    def _flush(self) -> None:
        replies, self._replies = self._replies, {}
        for loop, batch in replies.items():
            try:
                loop.call_soon_threadsafe(_run_all, batch)
            except RuntimeError:  # that loop is closed: nobody is waiting any more
                pass

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
                    self._flush()
                    return
                item()
                try:
                    item = self._commands.get_nowait()
                except queue.Empty:
                    item = _NOTHING
            self._flush()
            if self.engine.has_work():
                began = time.perf_counter()
                rows = self.engine.step()
                self._flush()
                if self.on_step is not None:
                    self.on_step(rows, time.perf_counter() - began)
            else:
                self.engine.expire_idle()


def _run_all(batch: list[tuple[Callable, tuple]]) -> None:
    for callback, args in batch:
        callback(*args)


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
        return await self.thread.call(lambda: fn(*args, **kwargs), loop)

    def _submit(self, submit: Callable[..., Any], refused: Callable[[Exception], None],
                *args, **kwargs) -> dict[str, Any]:
        """Post `submit(*args, **kwargs)` without waiting for the engine to take it; a refusal
        goes to `refused(error)` on this loop. Returns the handle `_withdraw` takes."""
        loop = asyncio.get_running_loop()
        taken: dict[str, Any] = {}  # shared with the engine thread; dict updates are atomic

        def run():
            if taken.get("abandoned"):
                return
            try:
                taken["work"] = submit(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - the caller maps it to a status
                self.thread.reply(loop, refused, err)

        self.thread.post(run)
        return taken

    def _withdraw(self, taken: dict[str, Any]) -> None:
        """A caller that went away withdraws its work (else a continuation would hold its
        session and refuse the caller's retry, and a generation its slot): never submitted if
        the engine has not come to it yet, else cancelled by a command queued behind it."""
        taken["abandoned"] = True
        self.thread.post(lambda: "work" in taken and self.engine.cancel(taken["work"]))

    async def open_session(self, owner: str, from_exit: int) -> tuple[str, int]:
        return await self._call(self.engine.open_session, owner, from_exit)

    async def continue_(self, session_id: str, owner: str, start: int, rows: np.ndarray,
                        return_all: bool, top_k: int, rollback: bool) -> Answer:
        loop = asyncio.get_running_loop()
        answered = loop.create_future()
        reply = self.thread.reply
        taken = self._submit(
            self.engine.submit_continue, lambda err: _settle(answered, None, err),
            session_id, owner, start, rows, return_all=return_all, top_k=top_k,
            rollback=rollback, on_done=lambda work: reply(loop, _settle, answered, work, None))
        try:
            work = await answered
        except asyncio.CancelledError:
            self._withdraw(taken)
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
        tokens: asyncio.Queue = asyncio.Queue()  # ints, then the finished Work or a refusal
        reply = self.thread.reply
        taken = self._submit(
            self.engine.submit_generate, tokens.put_nowait, owner, token_ids, max_new_tokens,
            sampling, stop_ids, on_token=lambda token: reply(loop, tokens.put_nowait, token),
            on_done=lambda work: reply(loop, tokens.put_nowait, work))
        finished = False
        try:
            while True:
                item = await tokens.get()
                if isinstance(item, int):
                    yield item
                    continue
                finished = True
                if isinstance(item, Exception):
                    raise item
                if item.error is not None:
                    raise item.error
                return
        finally:
            if not finished:  # the caller stopped listening: free the slot
                self._withdraw(taken)

    async def ended_sessions(self) -> list[str]:
        return await self._call(self.engine.ended_sessions)

    async def stats(self) -> dict:
        return await self._call(self.engine.stats)
