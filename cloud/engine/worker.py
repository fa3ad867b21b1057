"""An engine worker process: the model blocks and KV caches, behind a ZeroMQ DEALER socket.

    python -m cloud.engine.worker FAMILY --connect ipc:///tmp/flow.sock     (or tcp://frontend:5555)

The front end (`cloud.engine.multiprocess`) binds a ROUTER; a worker loads the family, connects a
DEALER and says HELLO with its family hash (a worker of another family is turned away). The front
end answers with the tier's `EngineConfig`, so every worker, local or on another host, serves with
the tier's limits; the worker builds its engine from it, says READY, then serves commands between
engine steps and sends a heartbeat every `HEARTBEAT_S` so the front end notices a dead worker.
The messages are `cloud.engine.frames`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import zmq

from cloud.engine.config import EngineConfig
from cloud.engine.core import Engine
from cloud.engine.frames import HEARTBEAT_S, error_header, pack, unpack
from flow.family import Family
from flow.tier import SamplingParams


class EngineProc:
    """One engine served over a DEALER socket until told to stop."""

    def __init__(self, family: Family, endpoint: str):
        self.family = family
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)
        self.engine = None
        self.works: dict[int, object] = {}  # request id -> engine Work (for cancel)
        self.steps: list[tuple[int, float]] = []  # (rows, seconds) since the last heartbeat

    def send(self, header: dict, rows: np.ndarray | None = None) -> None:
        self.socket.send_multipart(pack(header, rows))

    def run(self) -> int:
        """Join the front end, then serve; the process's exit status."""
        self.send({"op": "hello", "family_hash": self.family.family_hash(), "pid": os.getpid()})
        header, _, _ = unpack(self.socket.recv_multipart())
        if header["op"] != "welcome":  # turned away (another family), or shut down meanwhile
            return 0
        try:
            self.engine = Engine.from_config(self.family, EngineConfig.from_dict(header["engine"]))
        except Exception as err:  # noqa: BLE001 - reported to the front end, which names it
            self.send({"op": "ready", "pid": os.getpid(), **error_header(err)})
            return 1
        self.send({"op": "ready", "pid": os.getpid()})
        self.serve()
        return 0

    def serve(self) -> None:
        last_beat = time.monotonic()
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        while True:
            timeout_ms = 0 if self.engine.has_work() else int(HEARTBEAT_S * 1000)
            for _ in range(256):  # take every queued command before the next step
                if not dict(poller.poll(timeout_ms)):
                    break
                timeout_ms = 0
                header, rows, _ = unpack(self.socket.recv_multipart())
                if header["op"] == "shutdown":
                    return
                self.handle(header, rows)
            if self.engine.has_work():
                began = time.perf_counter()
                rows = self.engine.step()
                self.steps.append((rows, time.perf_counter() - began))
            else:
                self.engine.expire_idle()
            if time.monotonic() - last_beat >= HEARTBEAT_S:
                stats = {k: v for k, v in self.engine.stats().items() if k != "last_batch"}
                self.send({"op": "heartbeat", "stats": stats, "steps": self.steps})
                self.steps = []
                last_beat = time.monotonic()

    def handle(self, header: dict, rows: np.ndarray | None) -> None:
        op, rid = header["op"], header.get("id")
        try:
            if op == "open":
                session_id, frontier = self.engine.open_session(header["owner"], header["from_exit"])
                self.send({"id": rid, "session_id": session_id, "frontier": frontier})
            elif op == "continue":
                self.works[rid] = self.engine.submit_continue(
                    header["session_id"], header["owner"], header["start"], rows,
                    return_all=header["return_all"], top_k=header["top_k"],
                    rollback=header["rollback"], on_done=lambda work, rid=rid: self.finished(rid, work))
            elif op == "rollback":
                frontier = self.engine.rollback(header["session_id"], header["owner"], header["position"])
                self.send({"id": rid, "frontier": frontier})
            elif op == "close":
                self.engine.close(header["session_id"], header["owner"])
                self.send({"id": rid})
            elif op == "generate":
                self.works[rid] = self.engine.submit_generate(
                    header["owner"], header["token_ids"], header["max_new_tokens"],
                    SamplingParams(**header["sampling"]), tuple(header["stop_ids"]),
                    on_token=lambda token, rid=rid: self.send({"id": rid, "token": token}),
                    on_done=lambda work, rid=rid: self.finished(rid, work))
            elif op == "cancel":
                work = self.works.pop(header["target"], None)
                if work is not None:
                    self.engine.cancel(work)
            else:
                raise ValueError(f"unknown op {op!r}")
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
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default torch's: every core of this host)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return EngineProc(Family.load(args.family), args.connect).run()


if __name__ == "__main__":
    sys.exit(main())
