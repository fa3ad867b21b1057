"""An engine worker process: the model blocks and KV caches, behind a ZeroMQ DEALER socket.

    python -m cloud.worker FAMILY --connect ipc:///tmp/flow.sock     (or tcp://frontend:5555)

The front end binds a ROUTER; each worker connects a DEALER, says HELLO (with its family hash, so
a worker of another family is turned away), then serves commands between engine steps and sends
a heartbeat while idle so the front end notices a dead worker.

Messages are multipart: one JSON header frame, then the binary parts the header lists in
`parts`: "answer", a `flow.v1.ContinueResponse` (`Continuation.to_pb`), and "rows", raw
little-endian float32 hand-off rows of the header's `shape` — never pickle, so a worker reachable
over tcp:// executes nothing it is sent. Errors travel as `flow.status` statuses.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HEARTBEAT_S = 0.5


# ---- the message format (shared with cloud.workers) ------------------------------------------

def pack(header: dict, rows: np.ndarray | None = None, answer=None) -> list[bytes]:
    """Frames of a message: `header`, then an answer (a `Continuation`) and rows if given."""
    header, parts = {**header, "parts": []}, []
    if answer is not None:
        header["parts"].append("answer")
        parts.append(answer.to_pb().SerializeToString())
        header["scores"] = answer.scores  # an edge engine's confidence (not on the wire)
    if rows is not None:
        rows = np.ascontiguousarray(rows, dtype="<f4")
        header["parts"].append("rows")
        header["shape"] = list(rows.shape)
        parts.append(rows.tobytes())
    return [json.dumps(header).encode(), *parts]


def unpack(frames: list[bytes]) -> tuple[dict, np.ndarray | None, object]:
    """(header, rows or None, `Continuation` or None) of a message's frames."""
    from flow.tier import Continuation
    from flow.v1 import tier_pb2

    header = json.loads(frames[0])
    parts = dict(zip(header.get("parts", ()), frames[1:], strict=True))
    rows = answer = None
    if "rows" in parts:
        rows = np.frombuffer(parts["rows"], dtype="<f4").reshape(header["shape"]).astype(np.float32)
    if "answer" in parts:
        answer = Continuation.from_pb(tier_pb2.ContinueResponse.FromString(parts["answer"]))
        answer.scores, answer.handoff = header.get("scores", []), rows
    return header, rows, answer


def error_header(err: Exception) -> dict:
    """A refusal as a header the front end turns back into the same error (`flow.status`)."""
    from flow.status import status_of
    from flow.tier import TierError

    status = status_of(err) or status_of(TierError(f"{type(err).__name__}: {err}"))
    return {"error": {"code": status.code, "message": status.message,
                      "trailers": [list(t) for t in status.trailers]}}


def error_from_header(header: dict) -> Exception:
    """The error a worker reported with `error_header`."""
    from flow.status import error_of

    error = header["error"]
    return error_of(error["code"], error["message"], [tuple(t) for t in error["trailers"]])


# ---- the worker ---------------------------------------------------------------------------------

class Worker:
    """Serves one engine over a DEALER socket until told to stop or the front end goes away."""

    def __init__(self, engine, family_hash: str, endpoint: str):
        import zmq

        self.engine, self.family_hash = engine, family_hash
        self.context = zmq.Context.instance()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)
        self.works: dict[int, object] = {}  # request id -> engine Work (for cancel)
        self.steps: list[tuple[int, float]] = []  # (rows, seconds) since the last heartbeat

    def send(self, header: dict, rows: np.ndarray | None = None) -> None:
        self.socket.send_multipart(pack(header, rows))

    def run(self) -> None:
        import zmq

        self.send({"op": "hello", "family_hash": self.family_hash, "pid": os.getpid()})
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
                from flow.tier import SamplingParams

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
    parser = argparse.ArgumentParser(description="A familial-flow engine worker (ZeroMQ DEALER).")
    parser.add_argument("family", type=Path, help="family directory")
    parser.add_argument("--connect", required=True, help="the front end's ROUTER endpoint")
    parser.add_argument("--max-sessions", type=int, default=64)
    parser.add_argument("--max-rows", type=int, default=512)
    parser.add_argument("--max-batch-rows", type=int, default=2048)
    parser.add_argument("--session-ttl", type=float, default=600.0)
    parser.add_argument("--max-context", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--to-exit", type=int, default=None, help="an edge's answering exit")
    parser.add_argument("--policy", default="max_prob", help="an edge's confidence policy")
    args = parser.parse_args(argv)
    import torch

    from cloud.engine import Engine, EngineLimits
    from flow.family import Family

    if args.threads:
        torch.set_num_threads(args.threads)
    family = Family.load(args.family)
    limits = EngineLimits(max_sessions=args.max_sessions, max_rows_per_request=args.max_rows,
                          max_batch_rows=args.max_batch_rows, session_ttl_s=args.session_ttl,
                          max_context=args.max_context)
    engine = Engine(family, limits=limits, to_exit=args.to_exit, policy=args.policy)
    Worker(engine, family.family_hash(), args.connect).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
