"""An engine worker process: the model blocks and KV caches, behind a ZeroMQ DEALER socket.

    python -m cloud.engine.worker FAMILY --connect tcp://frontend:5555 --worker-key worker.key

The front end (`cloud.engine.multiprocess`) binds a ROUTER; a worker loads the family, connects a
DEALER as a CURVE client with the worker key (`cloud.engine.keys`; the front end admits no one
without it) and says HELLO with its family hash (a worker of another family is turned away). The
front end answers with the tier's `EngineConfig`, so every worker, local or on another host,
serves with the tier's limits; the worker builds its engine from it, says READY, then serves
commands between engine steps and sends a heartbeat every `HEARTBEAT_S` so the front end notices
a dead worker. The messages are `cloud.engine.frames`; a malformed one is logged and dropped. A
local worker is started with `--parent-pid` and exits once that process (its front end) is gone,
however it ended. A worker that hears nothing from its front end (which pings every
`HEARTBEAT_S`) for `FRONT_END_SILENT_S` drops its engine and its sessions and joins again, so
a remote worker serves whichever front end comes back on the endpoint.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import zmq

from cloud.engine.config import EngineConfig
from cloud.engine.core import Engine
from cloud.engine.frames import (
    FRONT_END_SILENT_S,
    HEARTBEAT_S,
    MalformedFrame,
    error_header,
    pack,
    unpack,
)
from cloud.engine.keys import WorkerKey
from flow.errors import ConfigError
from flow.family import Family
from flow.tier import InvalidRequest, SamplingParams

log = logging.getLogger("flow.cloud.worker")

_UNWELCOMED_WARNING_S = 10.0  # no welcome for this long: say what may be wrong


class EngineProc:
    """One engine served over a DEALER socket until told to stop (or its parent is gone)."""

    def __init__(self, family: Family, endpoint: str, key: WorkerKey, parent_pid: int | None = None):
        self.family, self.endpoint, self.parent_pid = family, endpoint, parent_pid
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        key.join(self.socket)
        self.socket.connect(endpoint)
        self.poller = zmq.Poller()
        self.poller.register(self.socket, zmq.POLLIN)
        self.engine = None
        self.works: dict[int, object] = {}  # request id -> engine Work (for cancel)
        self.steps: list[tuple[int, float]] = []  # (rows, seconds) since the last heartbeat
        self.dropped_frames = 0
        self.last_heard = time.monotonic()  # when the front end last sent anything

    def send(self, header: dict, rows: np.ndarray | None = None) -> None:
        self.socket.send_multipart(pack(header, rows))

    def orphaned(self) -> bool:
        """Whether the front end that started this worker is gone (it was re-parented)."""
        return self.parent_pid is not None and os.getppid() != self.parent_pid

    def receive(self, timeout_ms: int) -> tuple[dict, np.ndarray | None] | None:
        """The next well-formed message (header, rows), or None if none came within
        `timeout_ms`; a malformed one is logged, counted and dropped (None too)."""
        if not dict(self.poller.poll(timeout_ms)):
            return None
        frames = self.socket.recv_multipart()
        self.last_heard = time.monotonic()
        try:
            header, rows, _ = unpack(frames)
        except MalformedFrame as err:
            log.warning("dropped a malformed message from the front end: %s", err)
            self.dropped_frames += 1
            return None
        return header, rows

    def run(self) -> int:
        """Join the front end and serve, joining again whenever it falls silent; the process's
        exit status."""
        while True:
            header = self.join()
            if header is None:  # turned away (another family), shut down, or orphaned
                return 0
            try:
                self.engine = Engine.from_config(self.family,
                                                 EngineConfig.from_dict(header["engine"]))
            except Exception as err:  # noqa: BLE001 - reported to the front end, which names it
                self.send({"op": "ready", "pid": os.getpid(), **error_header(err)})
                return 1
            self.send({"op": "ready", "pid": os.getpid()})
            if not self.serve():
                return 0
            log.warning("nothing from the front end at %s for %.0f s; dropping this engine's "
                        "sessions and joining again", self.endpoint, FRONT_END_SILENT_S)
            self.engine, self.works, self.steps = None, {}, []

    def join(self) -> dict | None:
        """Say HELLO until welcomed: the welcome (with the tier's engine config), or None when
        told to shut down or orphaned."""
        self.send({"op": "hello", "family_hash": self.family.family_hash(), "pid": os.getpid()})
        began = warned = time.monotonic()
        while not self.orphaned():
            message = self.receive(int(HEARTBEAT_S * 1000))
            header = message[0] if message is not None else {}
            if header.get("op") == "welcome":
                return header
            if header.get("op") == "shutdown":
                return None
            if time.monotonic() - warned > _UNWELCOMED_WARNING_S:
                log.warning("no welcome from %s after %.0f s: is the front end up, and is "
                            "--worker-key its key?", self.endpoint, time.monotonic() - began)
                warned = time.monotonic()
                # a front end started since missed the first HELLO (ZeroMQ drops messages to a
                # peer that is not connected yet)
                self.send({"op": "hello", "family_hash": self.family.family_hash(),
                           "pid": os.getpid()})
        return None

    def serve(self) -> bool:
        """Serve until told to shut down or orphaned (False), or until the front end has been
        silent for `FRONT_END_SILENT_S` (True: join again)."""
        last_beat = time.monotonic()
        self.last_heard = time.monotonic()
        while not self.orphaned():
            timeout_ms = 0 if self.engine.has_work() else int(HEARTBEAT_S * 1000)
            for _ in range(256):  # take every queued command before the next step
                if not dict(self.poller.poll(timeout_ms)):
                    break
                timeout_ms = 0
                message = self.receive(0)
                if message is None:
                    continue
                if message[0].get("op") == "shutdown":
                    return False
                self.handle(*message)
            if time.monotonic() - self.last_heard > FRONT_END_SILENT_S:
                return True
            if self.engine.has_work():
                began = time.perf_counter()
                rows = self.engine.step()
                self.steps.append((rows, time.perf_counter() - began))
            else:
                self.engine.expire_idle()
            if time.monotonic() - last_beat >= HEARTBEAT_S:
                stats = {k: v for k, v in self.engine.stats().items() if k != "last_batch"}
                stats["dropped_frames"] = self.dropped_frames
                self.send({"op": "heartbeat", "stats": stats, "steps": self.steps,
                           "ended": self.engine.ended_sessions()})
                self.steps = []
                last_beat = time.monotonic()
        log.warning("the front end (pid %s) is gone; exiting", self.parent_pid)
        return False

    def handle(self, header: dict, rows: np.ndarray | None) -> None:
        """Run one request; a refusal (a request missing its fields too) goes back to its id."""
        op, rid = header.get("op"), header.get("id")
        try:
            if op == "open":
                session_id, frontier = self.engine.open_session(header["owner"], header["from_exit"])
                self.send({"id": rid, "session_id": session_id, "frontier": frontier,
                           "ended": self.engine.ended_sessions()})
            elif op == "continue":
                self.works[rid] = self.engine.submit_continue(
                    header["session_id"], header["owner"], header["start"], rows,
                    return_all=header["return_all"], top_k=header["top_k"],
                    rollback=header["rollback"], on_done=lambda work, rid=rid: self.finished(rid, work))
            elif op == "rollback":
                frontier = self.engine.rollback(header["session_id"], header["owner"], header["position"])
                self.send({"id": rid, "frontier": frontier})
            elif op == "close":
                closed = self.engine.close(header["session_id"], header["owner"])
                self.send({"id": rid, "closed": closed})
            elif op == "generate":
                self.works[rid] = self.engine.submit_generate(
                    header["owner"], header["token_ids"], header["max_new_tokens"],
                    SamplingParams(**header["sampling"]), tuple(header["stop_ids"]),
                    on_token=lambda token, rid=rid: self.send({"id": rid, "token": token}),
                    on_done=lambda work, rid=rid: self.finished(rid, work))
            elif op == "ping":
                pass  # the front end is alive: `receive` noted it
            elif op == "cancel":
                work = self.works.pop(header["target"], None)
                if work is not None:
                    self.engine.cancel(work)
            else:
                log.warning("dropped a message with no known op (%r) from the front end", op)
                self.dropped_frames += 1
                raise InvalidRequest(f"unknown op {op!r}")
        except KeyError as err:
            self.send({"id": rid, **error_header(InvalidRequest(f"{op} without {err}"))})
        except Exception as err:  # noqa: BLE001 - every refusal goes back to the caller
            self.send({"id": rid, **error_header(err)})

    def finished(self, rid: int, work) -> None:
        self.works.pop(rid, None)
        if work.error is not None:
            self.send({"id": rid, "done": True, **error_header(work.error)})
        elif isinstance(work.result, list):  # a generate: its tokens went out one by one
            self.send({"id": rid, "done": True})
        else:  # an edge engine's answer carries the rows for the next tier as a frame
            self.socket.send_multipart(pack({"id": rid, "done": True}, work.result.handoff,
                                            answer=work.result))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cloud.engine.worker",
        description="A familial-flow engine worker (ZeroMQ DEALER): it joins the front end of "
                    "`flow serve --workers N` or `--bind`, which sends it the tier's engine config.")
    parser.add_argument("family", type=Path, help="family directory")
    parser.add_argument("--connect", required=True, help="the front end's ROUTER endpoint")
    parser.add_argument("--worker-key", type=Path, required=True,
                        help="the front end's worker key file (`python -m cloud.engine.keys FILE` "
                             "makes one; `flow serve --worker-key FILE` takes the same file)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default torch's: every core of this host)")
    parser.add_argument("--parent-pid", type=int, default=None,
                        help="exit once this process is no longer this worker's parent (`flow "
                             "serve` sets it for the workers it starts)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s pid %(process)d %(message)s")
    try:
        key = WorkerKey.load(args.worker_key)
    except ConfigError as err:
        parser.error(str(err))
    if args.threads:
        torch.set_num_threads(args.threads)
    return EngineProc(Family.load(args.family), args.connect, key, args.parent_pid).run()


if __name__ == "__main__":
    sys.exit(main())
