"""`MultiprocessEngineClient`: engines in worker processes, behind a ZeroMQ ROUTER.

The front end binds a ROUTER (`ipc://` on one host, `tcp://` across hosts), starts its local
workers (`python -m cloud.engine.worker`), and admits every worker that says HELLO with the right
family hash: it sends it the tier's `EngineConfig` and counts it once it reports READY
(`cloud.engine.frames`). It places each new session on the worker with the fewest and routes that
session's requests to it. A worker is dead when its process exits or nothing (reply or heartbeat)
came from it for `dead_after_s`: its pending calls fail with `TierUnavailable` (UNAVAILABLE) and
its sessions are forgotten, so their next request gets NOT_FOUND and the device replays onto a
live worker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zmq
import zmq.asyncio

from cloud.engine.config import EngineConfig
from cloud.engine.frames import error_from_header, error_header, pack, unpack
from flow.tier import Answer, SamplingParams, SessionLost, TierUnavailable

log = logging.getLogger("flow.cloud.workers")


@dataclass
class _Worker:
    identity: bytes
    pid: int
    sessions: set[str] = field(default_factory=set)
    pending: set[int] = field(default_factory=set)
    last_seen: float = field(default_factory=time.monotonic)
    process: subprocess.Popen | None = None
    stats: dict = field(default_factory=dict)  # its engine's stats() at the last heartbeat


class MultiprocessEngineClient:
    """The `EngineClient` of engine workers behind a ROUTER socket at `endpoint`.

    `start()` spawns `local_workers` worker processes for the family in `family_dir` (splitting
    this host's cores between them) and waits until they are ready; more workers may join from
    other hosts at any time (`python -m cloud.engine.worker FAMILY --connect ENDPOINT`).
    """

    def __init__(self, endpoint: str, family_hash: str, config: EngineConfig,
                 family_dir: Path | None = None, local_workers: int = 0, dead_after_s: float = 3.0,
                 start_timeout_s: float = 120.0,
                 on_step: Callable[[int, float], None] | None = None):
        self.endpoint, self.family_hash, self.config = endpoint, family_hash, config
        self.family_dir, self.local_workers = family_dir, local_workers
        self.dead_after_s, self.start_timeout_s = dead_after_s, start_timeout_s
        self.on_step = on_step  # (rows, seconds) of every worker step, for metrics
        self.workers: dict[bytes, _Worker] = {}
        self.placement: dict[str, bytes] = {}  # session id -> worker identity
        self._joining: set[bytes] = set()  # said HELLO, not READY yet
        self._refusals: list[str] = []  # why workers could not build their engines
        self._calls: dict[int, asyncio.Future | asyncio.Queue] = {}
        self._ids = itertools.count(1)
        self._processes: list[subprocess.Popen] = []
        self._tasks: list[asyncio.Task] = []
        self._joined = asyncio.Event()

    # ---- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        self.context = zmq.asyncio.Context.instance()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(self.endpoint)
        self._tasks = [asyncio.create_task(self._receive()), asyncio.create_task(self._watch())]
        self._spawn()
        try:
            await self._wait_for_local_workers()
        except BaseException:
            await self.stop()  # the workers that did start go too
            raise

    async def _wait_for_local_workers(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while len(self.workers) < self.local_workers:
            if self._refusals:
                raise TierUnavailable(f"an engine worker could not start: {self._refusals[0]}")
            if time.monotonic() > deadline:
                raise TierUnavailable(f"only {len(self.workers)} of {self.local_workers} workers "
                                      f"joined {self.endpoint} within {self.start_timeout_s:.0f} s")
            self._joined.clear()
            try:
                await asyncio.wait_for(self._joined.wait(), 1.0)
            except TimeoutError:
                pass

    def _spawn(self) -> None:
        # Workers share the machine: split its cores between them rather than oversubscribe.
        threads = max(1, (os.cpu_count() or 1) // max(1, self.local_workers))
        for _ in range(self.local_workers):
            self._processes.append(subprocess.Popen(
                [sys.executable, "-m", "cloud.engine.worker", str(self.family_dir),
                 "--connect", self.endpoint, "--threads", str(threads)]))

    async def stop(self) -> None:
        for identity in [*self.workers, *self._joining]:
            await self.socket.send_multipart([identity, *pack({"op": "shutdown"})])
        for task in self._tasks:
            task.cancel()
        for process in self._processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
        self.socket.close()

    # ---- receiving ----------------------------------------------------------------------------

    async def _receive(self) -> None:
        while True:
            identity, *frames = await self.socket.recv_multipart()
            header, _, answer = unpack(frames)
            if answer is not None:
                header["answer"] = answer
            op = header.get("op")
            if op == "hello":
                await self._welcome(identity, header)
                continue
            if op == "ready":
                self._admit(identity, header)
                continue
            worker = self.workers.get(identity)
            if worker is None:
                continue  # a worker we declared dead came back late: ignore it
            worker.last_seen = time.monotonic()
            if op == "heartbeat":
                worker.stats = header.get("stats", {})
                for rows, seconds in header.get("steps", ()):
                    if self.on_step is not None:
                        self.on_step(rows, seconds)
                continue
            self._deliver(worker, header)

    async def _welcome(self, identity: bytes, header: dict) -> None:
        """A worker's HELLO: the tier's engine config if it serves this family, else goodbye."""
        if header.get("family_hash") != self.family_hash:
            log.error("worker pid %s serves another family (%s…); sending it away",
                      header.get("pid"), str(header.get("family_hash"))[:16])
            await self.socket.send_multipart([identity, *pack({"op": "shutdown"})])
            return
        self._joining.add(identity)
        await self.socket.send_multipart(
            [identity, *pack({"op": "welcome", "engine": self.config.to_dict()})])

    def _admit(self, identity: bytes, header: dict) -> None:
        """A worker's READY: it serves from now on (or it says why it cannot, and exits)."""
        if identity not in self._joining:
            return  # never welcomed: not one of ours
        self._joining.discard(identity)
        if "error" in header:
            why = str(error_from_header(header))
            log.error("worker pid %s could not build its engine: %s", header.get("pid"), why)
            self._refusals.append(why)
            self._joined.set()
            return
        process = next((p for p in self._processes if p.pid == header.get("pid")), None)
        self.workers[identity] = _Worker(identity, header.get("pid", -1), process=process)
        log.info("worker pid %s joined (%d workers)", header.get("pid"), len(self.workers))
        self._joined.set()

    def _deliver(self, worker: _Worker, header: dict) -> None:
        rid = header.get("id")
        target = self._calls.get(rid)
        if target is None:
            return
        if isinstance(target, asyncio.Queue):  # a generate stream
            target.put_nowait(header)
            if header.get("done") or "error" in header:
                self._finish(rid, worker)
            return
        self._finish(rid, worker)
        if not target.done():
            if "error" in header:
                target.set_exception(error_from_header(header))
            else:
                target.set_result(header)

    def _finish(self, rid: int, worker: _Worker) -> None:
        self._calls.pop(rid, None)
        worker.pending.discard(rid)

    # ---- liveness -----------------------------------------------------------------------------

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            for worker in list(self.workers.values()):
                exited = worker.process is not None and worker.process.poll() is not None
                if exited or now - worker.last_seen > self.dead_after_s:
                    self._bury(worker, "exited" if exited else "stopped answering")

    def _bury(self, worker: _Worker, why: str) -> None:
        log.error("worker pid %s %s; its %d sessions are lost", worker.pid, why, len(worker.sessions))
        self.workers.pop(worker.identity, None)
        for session_id in worker.sessions:
            self.placement.pop(session_id, None)
        error = TierUnavailable(f"the engine worker serving this request {why}; replay the session")
        for rid in list(worker.pending):
            target = self._calls.pop(rid, None)
            if isinstance(target, asyncio.Queue):
                target.put_nowait(error_header(error))
            elif target is not None and not target.done():
                target.set_exception(error)

    # ---- calls --------------------------------------------------------------------------------

    def _choose(self) -> _Worker:
        if not self.workers:
            raise TierUnavailable("no engine worker is connected; retry shortly")
        return min(self.workers.values(), key=lambda w: len(w.sessions) + len(w.pending))

    def _worker_of(self, session_id: str) -> _Worker:
        identity = self.placement.get(session_id)
        if identity is None or identity not in self.workers:
            raise SessionLost("unknown or lost session (its worker may have restarted); open a new "
                              "session and replay from position 0")
        return self.workers[identity]

    async def _request(self, worker: _Worker, header: dict, rows: np.ndarray | None = None,
                       stream: bool = False):
        rid = next(self._ids)
        target = asyncio.Queue() if stream else asyncio.get_running_loop().create_future()
        self._calls[rid] = target
        worker.pending.add(rid)
        await self.socket.send_multipart([worker.identity, *pack({**header, "id": rid}, rows)])
        return rid, target

    async def _ask(self, worker: _Worker, header: dict, rows: np.ndarray | None = None) -> dict:
        rid, future = await self._request(worker, header, rows)
        try:
            return await future
        except asyncio.CancelledError:
            await self._cancel(worker, rid)
            raise

    async def _cancel(self, worker: _Worker, rid: int) -> None:
        """Tell a live worker to drop a call nobody waits for (not after `stop()`: the socket
        is closed then, and the worker was told to shut down)."""
        if worker.identity in self.workers and not self.socket.closed:
            await self.socket.send_multipart([worker.identity, *pack({"op": "cancel", "target": rid})])

    async def open_session(self, owner: str, from_exit: int) -> tuple[str, int]:
        worker = self._choose()
        answer = await self._ask(worker, {"op": "open", "owner": owner, "from_exit": from_exit})
        self.placement[answer["session_id"]] = worker.identity
        worker.sessions.add(answer["session_id"])
        return answer["session_id"], answer["frontier"]

    async def continue_(self, session_id: str, owner: str, start: int, rows: np.ndarray,
                        return_all: bool, top_k: int, rollback: bool) -> Answer:
        worker = self._worker_of(session_id)
        answer = await self._ask(worker, {"op": "continue", "session_id": session_id, "owner": owner,
                                          "start": start, "return_all": return_all, "top_k": top_k,
                                          "rollback": rollback}, rows)
        return answer["answer"]

    async def rollback(self, session_id: str, owner: str, position: int) -> int:
        answer = await self._ask(self._worker_of(session_id), {
            "op": "rollback", "session_id": session_id, "owner": owner, "position": position})
        return answer["frontier"]

    async def close(self, session_id: str, owner: str) -> None:
        worker = self._worker_of(session_id)
        await self._ask(worker, {"op": "close", "session_id": session_id, "owner": owner})
        worker.sessions.discard(session_id)
        self.placement.pop(session_id, None)

    async def generate(self, owner: str, token_ids: list[int], max_new_tokens: int,
                       sampling: SamplingParams,
                       stop_ids: tuple[int, ...]) -> AsyncIterator[int]:
        worker = self._choose()
        rid, stream = await self._request(worker, {
            "op": "generate", "owner": owner, "token_ids": token_ids, "max_new_tokens": max_new_tokens,
            "sampling": dataclasses.asdict(sampling),
            "stop_ids": list(stop_ids)}, stream=True)
        finished = False
        try:
            while True:
                header = await stream.get()
                if "error" in header:
                    finished = True
                    raise error_from_header(header)
                if "token" in header:
                    yield header["token"]
                if header.get("done"):
                    finished = True
                    return
        finally:
            if not finished:
                await self._cancel(worker, rid)

    async def stats(self) -> dict:
        """The workers' engine counters summed, as of their last heartbeats."""
        total: dict = {"workers": len(self.workers)}
        for worker in self.workers.values():
            for key, value in worker.stats.items():
                if isinstance(value, int | float):
                    total[key] = total.get(key, 0) + value
        return total
