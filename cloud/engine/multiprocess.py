"""`MultiprocessEngineClient`: engines in worker processes, behind a ZeroMQ ROUTER.

The front end binds a ROUTER (`ipc://` on one host, by default in a private temporary directory;
`tcp://` across hosts) as a CURVE server with the worker key (`cloud.engine.keys`), so only a
peer holding the key connects. It starts its local workers (`python -m cloud.engine.worker`,
handed the key in a file of that directory until they have joined, told to exit when this
process is gone) and admits every worker that
says HELLO with the right family hash: it sends it the tier's `EngineConfig` and counts it once it
reports READY (`cloud.engine.frames`). It places each new session on the worker with the fewest
and routes that session's requests to it; a reply counts only from the worker its request went
to, and a malformed message is dropped. A worker is dead when its process exits or nothing
(reply or heartbeat) came from it for `dead_after_s`: its sessions are forgotten and its pending
calls fail with `SessionLost` (NOT_FOUND: the device reopens and replays onto a live worker), or
with `TierUnavailable` (UNAVAILABLE) when no worker is left or the call was a generation. The
front end pings every worker every `HEARTBEAT_S` in turn: a worker whose front end falls silent
joins again (HELLO), and a known worker saying HELLO is buried first (it dropped its sessions).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zmq
import zmq.asyncio
from zmq.auth.thread import ThreadAuthenticator

from cloud.engine.config import EngineConfig
from cloud.engine.frames import (
    HEARTBEAT_S,
    MalformedFrame,
    error_from_header,
    error_header,
    pack,
    unpack,
)
from cloud.engine.keys import WorkerKey
from flow.cores import threads_per_process
from flow.errors import ConfigError
from flow.tier import Answer, SamplingParams, SessionLost, TierError, TierUnavailable

log = logging.getLogger("flow.cloud.workers")


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass
class _Worker:
    identity: bytes
    pid: int
    sessions: set[str] = field(default_factory=set)
    pending: set[int] = field(default_factory=set)
    last_seen: float = field(default_factory=time.monotonic)
    process: subprocess.Popen | None = None
    stats: dict = field(default_factory=dict)  # its engine's stats() at the last heartbeat

    def exited(self) -> bool:
        """Whether it is a local worker whose process has ended."""
        return self.process is not None and self.process.poll() is not None


@dataclass
class _Call:
    """A request waiting for its answer from the worker it was sent to."""

    worker: bytes  # that worker's identity
    target: asyncio.Future | asyncio.Queue  # a generation's tokens go to a queue


class MultiprocessEngineClient:
    """The `EngineClient` of engine workers behind a ROUTER socket at `endpoint`.

    `start()` spawns `local_workers` worker processes for the family in `family_dir` (splitting
    this host's cores between them) and waits until they are ready; more workers holding
    `worker_key` may join from other hosts at any time (`python -m cloud.engine.worker FAMILY
    --connect ENDPOINT --worker-key FILE`). Without an `endpoint` the ROUTER binds an ipc://
    socket in a private temporary directory; without a `worker_key` a fresh one is made, which
    only the local workers get (a tcp:// endpoint needs the operator's key).
    """

    def __init__(self, endpoint: str | None, family_hash: str, config: EngineConfig,
                 family_dir: Path | None = None, local_workers: int = 0, dead_after_s: float = 3.0,
                 start_timeout_s: float = 120.0,
                 on_step: Callable[[int, float], None] | None = None,
                 worker_key: WorkerKey | None = None):
        if worker_key is None and endpoint is not None and not endpoint.startswith("ipc://"):
            raise ConfigError(f"workers joining {endpoint} need a worker key: make one with "
                              f"`python -m cloud.engine.keys FILE`, give it to `flow serve "
                              f"--worker-key FILE` and to each worker's `--worker-key FILE`")
        self.worker_key = worker_key or WorkerKey.generate()
        self.endpoint = endpoint  # None: chosen by `start()`
        self.family_hash, self.config = family_hash, config
        self.family_dir, self.local_workers = family_dir, local_workers
        self.dead_after_s, self.start_timeout_s = dead_after_s, start_timeout_s
        self.on_step = on_step  # (rows, seconds) of every worker step, for metrics
        self.workers: dict[bytes, _Worker] = {}
        self.placement: dict[str, bytes] = {}  # session id -> worker identity
        # Sessions the workers ended on their own (evicted, expired) or lost with a worker, for
        # `ended_sessions`; bounded, as nothing but an edge reads it.
        self._ended: deque[str] = deque(maxlen=4096)
        self.dropped_frames = 0  # malformed or misdirected messages dropped by the front end
        self._joining: set[bytes] = set()  # said HELLO, not READY yet
        self._refusals: list[str] = []  # why workers could not build their engines
        self._calls: dict[int, _Call] = {}
        self._ids = itertools.count(1)
        self._processes: list[subprocess.Popen] = []
        self._tasks: list[asyncio.Task] = []
        self._joined = asyncio.Event()
        self._private_dir: Path | None = None  # the local workers' key file, the default socket
        self._bound = False

    # ---- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        self._private_dir = Path(tempfile.mkdtemp(prefix="flow-engine-"))  # mode 0700
        self.endpoint = self.endpoint or f"ipc://{self._private_dir / 'engine.sock'}"
        # A context of its own: ZeroMQ authenticates (ZAP) per context, and tests run several
        # front ends in one process.
        self.context = zmq.asyncio.Context()
        self.authenticator = ThreadAuthenticator(self.context)
        self.socket = self.context.socket(zmq.ROUTER)
        try:
            self.authenticator.start()
            self.authenticator.configure_curve_callback("*", self.worker_key)
            self.socket.setsockopt(zmq.LINGER, 0)
            self.worker_key.serve(self.socket)
            self.socket.bind(self.endpoint)
            self._bound = True
            self._tasks = [asyncio.create_task(self._receive()), asyncio.create_task(self._watch())]
            self._spawn()
            await self._wait_for_local_workers()
            # Every local worker has read its key: none stays on disk, even after a SIGKILL.
            (self._private_dir / "worker.key").unlink(missing_ok=True)
            if not self.endpoint.startswith(f"ipc://{self._private_dir}/"):
                self._remove_private_dir()
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
        if not self.local_workers:
            return
        # The key goes in a file only this user can reach, never on a command line (`ps`).
        key_file = self._private_dir / "worker.key"
        self.worker_key.save(key_file)
        # Workers share this process's cores: split them rather than oversubscribe.
        threads = threads_per_process(self.local_workers)
        for _ in range(self.local_workers):
            self._processes.append(subprocess.Popen(
                [sys.executable, "-m", "cloud.engine.worker", str(self.family_dir),
                 "--connect", self.endpoint, "--worker-key", str(key_file),
                 "--threads", str(threads), "--parent-pid", str(os.getpid())]))

    async def stop(self) -> None:
        for identity in [*self.workers, *self._joining]:
            await self.socket.send_multipart([identity, *pack({"op": "shutdown"})])
        for task in self._tasks:
            task.cancel()
        await asyncio.to_thread(self._end_processes)
        self.socket.close()
        self.authenticator.stop()
        self.context.term()
        socket_file = self.endpoint.removeprefix("ipc://")
        if self._bound and self.endpoint.startswith("ipc://") and not socket_file.startswith("@"):
            Path(socket_file).unlink(missing_ok=True)  # ZeroMQ leaves it behind (not abstract ones)
        self._remove_private_dir()

    def _remove_private_dir(self) -> None:
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)
            self._private_dir = None

    def _end_processes(self) -> None:
        for process in self._processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()

    # ---- receiving ----------------------------------------------------------------------------

    async def _receive(self) -> None:
        while True:
            identity, *frames = await self.socket.recv_multipart()
            try:
                await self._handle(identity, frames)
            except MalformedFrame as err:
                self._drop(identity, str(err))
            except Exception:  # noqa: BLE001 - one bad message must not end the receive loop
                log.exception("dropped a message that could not be handled")
                self.dropped_frames += 1

    def _drop(self, identity: bytes, why: str) -> None:
        worker = self.workers.get(identity)
        log.warning("dropped a message from %s: %s",
                    f"worker pid {worker.pid}" if worker else "a peer that has not joined", why)
        self.dropped_frames += 1

    async def _handle(self, identity: bytes, frames: list[bytes]) -> None:
        header, _, answer = unpack(frames)
        if answer is not None:
            header["answer"] = answer
        op = header.get("op")
        if op == "hello":
            await self._welcome(identity, header)
            return
        if op == "ready":
            self._admit(identity, header)
            return
        worker = self.workers.get(identity)
        if worker is None:
            return  # a worker we declared dead came back late: ignore it
        worker.last_seen = time.monotonic()
        if op == "heartbeat":
            self._beat(worker, header)
        elif op is None:
            self._deliver(worker, header)
        else:
            raise MalformedFrame(f"unknown op {op!r}")

    def _beat(self, worker: _Worker, header: dict) -> None:
        """A heartbeat's counters and step times, once they are checked for what they must be."""
        stats, steps = header.get("stats", {}), header.get("steps", [])
        if not isinstance(stats, dict) or not isinstance(steps, list) or not all(
                isinstance(step, list) and len(step) == 2 and all(map(_is_number, step))
                for step in steps):
            raise MalformedFrame("a heartbeat whose stats are not an object or whose steps are "
                                 "not [rows, seconds] pairs")
        worker.stats = stats
        self._forget_ended(worker, header.get("ended", []))
        if self.on_step is not None:
            for rows, seconds in steps:
                self.on_step(rows, seconds)

    async def _welcome(self, identity: bytes, header: dict) -> None:
        """A worker's HELLO: the tier's engine config if it serves this family, else goodbye."""
        if header.get("family_hash") != self.family_hash:
            log.error("worker pid %s serves another family (%s…); sending it away",
                      header.get("pid"), str(header.get("family_hash"))[:16])
            await self.socket.send_multipart([identity, *pack({"op": "shutdown"})])
            return
        if identity in self.workers:  # it took us for gone and dropped its sessions
            self._bury(self.workers[identity], "joined again")
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
        call = self._calls.get(rid) if isinstance(rid, int) else None
        if call is None:
            return  # a late answer to a call given up on (cancelled, or its worker buried)
        if call.worker != worker.identity:
            self._drop(worker.identity, f"an answer to request {rid}, which went to another worker")
            return
        target = call.target
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

    def _forget_ended(self, worker: _Worker, ended) -> None:
        """Drop the placement of the sessions `worker` says its engine ended (evicted for room,
        or expired): without it the table would grow with every abandoned session."""
        if not isinstance(ended, list) or not all(isinstance(s, str) for s in ended):
            raise MalformedFrame("a list of ended sessions that is not a list of ids")
        for session_id in ended:
            if session_id in worker.sessions:
                worker.sessions.discard(session_id)
                self.placement.pop(session_id, None)
                self._ended.append(session_id)

    # ---- liveness -----------------------------------------------------------------------------

    async def _watch(self) -> None:
        last_ping = 0.0
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            self._bury_exited()
            for worker in list(self.workers.values()):
                if now - worker.last_seen > self.dead_after_s:
                    self._bury(worker, "stopped answering")
            if now - last_ping >= HEARTBEAT_S:  # workers silent-watch us the same way
                for identity in list(self.workers):
                    await self.socket.send_multipart([identity, *pack({"op": "ping"})])
                last_ping = now

    def _bury_exited(self) -> None:
        """Bury the local workers whose process has ended (before a call is sent to one)."""
        for worker in list(self.workers.values()):
            if worker.exited():
                self._bury(worker, "exited")

    def _bury(self, worker: _Worker, why: str) -> None:
        log.error("worker pid %s %s; its %d sessions are lost", worker.pid, why, len(worker.sessions))
        self.workers.pop(worker.identity, None)
        for session_id in worker.sessions:
            self.placement.pop(session_id, None)
        self._ended.extend(worker.sessions)
        # A session's device replays it onto a live worker; with none left it goes offline.
        lost = (SessionLost(f"the engine worker holding this session {why}; open a new session "
                            f"and replay from position 0") if self.workers else
                TierUnavailable(f"the engine worker serving this request {why} and no other is "
                                f"connected; retry shortly"))
        for rid in list(worker.pending):
            call = self._calls.pop(rid, None)
            if call is None:
                continue
            if isinstance(call.target, asyncio.Queue):  # a generation has nothing to replay
                call.target.put_nowait(error_header(TierUnavailable(
                    f"the engine worker running this generation {why}; retry")))
            elif not call.target.done():
                call.target.set_exception(lost)

    # ---- calls --------------------------------------------------------------------------------

    def _choose(self) -> _Worker:
        self._bury_exited()
        if not self.workers:
            raise TierUnavailable("no engine worker is connected; retry shortly")
        return min(self.workers.values(), key=lambda w: len(w.sessions) + len(w.pending))

    def _worker_of(self, session_id: str) -> _Worker:
        self._bury_exited()
        worker = self.workers.get(self.placement.get(session_id))
        if worker is not None:
            return worker
        if not self.workers:
            raise TierUnavailable("no engine worker is connected; retry shortly")
        raise SessionLost("unknown or lost session (its worker may have restarted); open a new "
                          "session and replay from position 0")

    async def _request(self, worker: _Worker, header: dict, rows: np.ndarray | None = None,
                       stream: bool = False):
        rid = next(self._ids)
        target = asyncio.Queue() if stream else asyncio.get_running_loop().create_future()
        self._calls[rid] = _Call(worker.identity, target)
        worker.pending.add(rid)
        await self.socket.send_multipart([worker.identity, *pack({**header, "id": rid}, rows)])
        return rid, target

    async def _ask(self, worker: _Worker, header: dict, rows: np.ndarray | None = None,
                   returns: dict[str, type] | None = None) -> dict:
        """The worker's answer to `header`, which must hold the fields `returns` names, of
        their types (else `TierError`)."""
        rid, future = await self._request(worker, header, rows)
        try:
            answer = await future
        except asyncio.CancelledError:
            await self._cancel(worker, rid)
            raise
        for name, kind in (returns or {}).items():
            if not isinstance(answer.get(name), kind):
                raise TierError(f"engine worker pid {worker.pid} answered {header['op']} without "
                                f"a valid {name!r}")
        return answer

    async def _cancel(self, worker: _Worker, rid: int) -> None:
        """Tell a live worker to drop a call nobody waits for (not after `stop()`: the socket
        is closed then, and the worker was told to shut down)."""
        if worker.identity in self.workers and not self.socket.closed:
            await self.socket.send_multipart([worker.identity, *pack({"op": "cancel", "target": rid})])

    async def open_session(self, owner: str, from_exit: int) -> tuple[str, int]:
        while True:  # each retry follows a burial: it ends when one opens or none is left
            worker = self._choose()
            try:
                answer = await self._ask(worker, {"op": "open", "owner": owner,
                                                  "from_exit": from_exit},
                                         returns={"session_id": str, "frontier": int})
                break
            except SessionLost:
                continue  # the worker died before answering: another one opens it
        self._forget_ended(worker, answer.get("ended", []))
        self.placement[answer["session_id"]] = worker.identity
        worker.sessions.add(answer["session_id"])
        return answer["session_id"], answer["frontier"]

    async def continue_(self, session_id: str, owner: str, start: int, rows: np.ndarray,
                        return_all: bool, top_k: int, rollback: bool) -> Answer:
        worker = self._worker_of(session_id)
        answer = await self._ask(worker, {"op": "continue", "session_id": session_id, "owner": owner,
                                          "start": start, "return_all": return_all, "top_k": top_k,
                                          "rollback": rollback}, rows, returns={"answer": Answer})
        return answer["answer"]

    async def rollback(self, session_id: str, owner: str, position: int) -> int:
        answer = await self._ask(self._worker_of(session_id), {
            "op": "rollback", "session_id": session_id, "owner": owner, "position": position},
            returns={"frontier": int})
        return answer["frontier"]

    async def close(self, session_id: str, owner: str) -> None:
        self._bury_exited()
        worker = self.workers.get(self.placement.get(session_id))
        if worker is None:
            return  # unknown or lost: nothing to close
        try:
            answer = await self._ask(worker, {"op": "close", "session_id": session_id,
                                              "owner": owner}, returns={"closed": bool})
        except SessionLost:
            return  # its worker died meanwhile: closed as surely
        if answer["closed"]:  # not for a closer other than the owner: the session goes on
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

    async def ended_sessions(self) -> list[str]:
        ended = list(self._ended)
        self._ended.clear()
        return ended

    async def stats(self) -> dict:
        """The workers' engine counters (and per-stage seconds) summed, as of their last
        heartbeats, and the malformed messages dropped (`dropped_frames`, by the front end and
        the workers together)."""
        total: dict = {"workers": len(self.workers), "dropped_frames": self.dropped_frames}
        for worker in self.workers.values():
            for key, value in worker.stats.items():
                if _is_number(value):
                    total[key] = total.get(key, 0) + value
                elif isinstance(value, dict) and all(map(_is_number, value.values())):
                    into = total.setdefault(key, {})  # e.g. stage_seconds, summed per stage
                    for name, number in value.items():
                        into[name] = into.get(name, 0) + number
        return total
