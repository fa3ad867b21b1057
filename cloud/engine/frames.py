"""The messages between the front end (`cloud.engine.multiprocess`) and its engine workers
(`cloud.engine.worker`), over ZeroMQ ROUTER/DEALER.

A message is a multipart ZeroMQ message: one JSON header frame (UTF-8), then the binary parts the
header lists in `"parts"`, in that order:

    "answer"   a serialized `flow.v1.ContinueResponse` (`Answer.to_pb`)
    "rows"     raw little-endian float32 rows, of the header's `"shape"` [rows, hidden]

Never pickle: a worker reachable over tcp:// executes nothing it is sent.

Worker -> front end (the joining handshake, then answers and heartbeats):

    hello      {"op": "hello", "family_hash", "pid"}                first; another family's
                                                                    worker is told to shut down
    ready      {"op": "ready", "pid"}                               engine built from the welcome's
                                                                    config; or, with "error", why
                                                                    it could not be, and it exits
    heartbeat  {"op": "heartbeat", "stats", "steps"}                every `HEARTBEAT_S`: the
                                                                    engine's counters, and
                                                                    [rows, seconds] per step since
    answers    {"id", ...}                                          to the request `id`:
               open      "session_id", "frontier"
               rollback  "frontier"
               close     nothing more
               continue  "done": true, part "answer", "scores" (an edge engine's confidence per
                         answered row), and part "rows" (an edge engine's hand-off rows)
               generate  {"id", "token"} per token as it is made, then {"id", "done": true}
    refusals   {"id", "error": {"code", "message", "trailers"}}     a `flow.status` status; with
                                                                    "done" when queued work failed

Front end -> worker:

    welcome    {"op": "welcome", "engine"}                          `EngineConfig.to_dict()`
    open       {"op", "id", "owner", "from_exit"}
    continue   {"op", "id", "session_id", "owner", "start", "return_all", "top_k", "rollback"}
               with part "rows"
    rollback   {"op", "id", "session_id", "owner", "position"}
    close      {"op", "id", "session_id", "owner"}
    generate   {"op", "id", "owner", "token_ids", "max_new_tokens", "sampling", "stop_ids"}
               ("sampling": the fields of `flow.tier.SamplingParams`)
    cancel     {"op": "cancel", "target"}                           drop request `target`'s work
    shutdown   {"op": "shutdown"}
"""

from __future__ import annotations

import json

import numpy as np

from flow.status import error_of, status_of
from flow.tier import Answer, TierError
from flow.v1 import tier_pb2

HEARTBEAT_S = 0.5  # how often a worker reports; the front end buries one silent for longer


def pack(header: dict, rows: np.ndarray | None = None,
         answer: Answer | None = None) -> list[bytes]:
    """Frames of a message: `header`, then an answer (a `Answer`) and rows if given."""
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


def unpack(frames: list[bytes]) -> tuple[dict, np.ndarray | None, Answer | None]:
    """(header, rows or None, `Answer` or None) of a message's frames."""
    header = json.loads(frames[0])
    parts = dict(zip(header.get("parts", ()), frames[1:], strict=True))
    rows = answer = None
    if "rows" in parts:
        rows = np.frombuffer(parts["rows"], dtype="<f4").reshape(header["shape"]).astype(np.float32)
    if "answer" in parts:
        answer = Answer.from_pb(tier_pb2.ContinueResponse.FromString(parts["answer"]))
        answer.scores, answer.handoff = header.get("scores", []), rows
    return header, rows, answer


def error_header(err: Exception) -> dict:
    """A refusal as a header the front end turns back into the same error (`flow.status`)."""
    status = status_of(err) or status_of(TierError(f"{type(err).__name__}: {err}"))
    return {"error": {"code": status.code, "message": status.message,
                      "trailers": [list(t) for t in status.trailers]}}


def error_from_header(header: dict) -> Exception:
    """The error a worker reported with `error_header`."""
    error = header["error"]
    return error_of(error["code"], error["message"], [tuple(t) for t in error["trailers"]])
