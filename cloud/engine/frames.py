"""The messages between the front end (`cloud.engine.multiprocess`) and its engine workers
(`cloud.engine.worker`), over ZeroMQ ROUTER/DEALER.

A message is a multipart ZeroMQ message: one JSON header frame (UTF-8), then the binary parts the
header lists in `"parts"`, in that order:

    "answer"   a serialized `flow.v1.ContinueResponse` (`Answer.to_pb`)
    "rows"     raw little-endian float32 rows, of the header's `"shape"` [rows, hidden]

Never pickle: a worker reachable over tcp:// executes nothing it is sent. The channel is
authenticated (ZeroMQ CURVE with the worker key, `cloud.engine.keys`), yet each side still checks
every message: one that `unpack` cannot read (`MalformedFrame`), or with no known op, is logged,
counted (`dropped_frames`) and dropped, never fatal; a request missing its fields is refused.

Worker -> front end (the joining handshake, then answers and heartbeats):

    hello      {"op": "hello", "family_hash", "pid"}                first; another family's
                                                                    worker is told to shut down
    ready      {"op": "ready", "pid"}                               engine built from the welcome's
                                                                    config; or, with "error", why
                                                                    it could not be, and it exits
    heartbeat  {"op": "heartbeat", "stats", "steps", "ended"}       every `HEARTBEAT_S`: the
                                                                    engine's counters (and the
                                                                    worker's "dropped_frames"),
                                                                    [rows, seconds] per step since,
                                                                    the sessions it evicted or
                                                                    expired since
    answers    {"id", ...}                                          to the request `id`:
               open      "session_id", "frontier", "ended" (as in a heartbeat)
               rollback  "frontier"
               close     "closed": whether a session of that owner was open and is now closed
               continue  "done": true, part "answer", "scores" (an edge engine's confidence per
                         answered row), and part "rows" (an edge engine's hand-off rows)
               generate  {"id", "token"} per token as it is made, then {"id", "done": true}
    refusals   {"id", "error": {"code", "message", "trailers"}}     a `flow.status` status; with
                                                                    "done" when queued work failed

The front end takes an answer only from the worker its request went to.

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
    ping       {"op": "ping"}                                       every `HEARTBEAT_S` to each
                                                                    worker: a worker that hears
                                                                    nothing for `FRONT_END_SILENT_S`
                                                                    joins again (HELLO)
    shutdown   {"op": "shutdown"}
"""

from __future__ import annotations

import json

import numpy as np

from flow.status import error_of, status_of
from flow.tier import Answer, TierError
from flow.v1 import tier_pb2

HEARTBEAT_S = 0.5  # how often a worker reports; the front end buries one silent for longer
# A worker that hears nothing from its front end for this long takes it for gone (killed, or
# frozen long enough to have buried the worker) and joins again: a restarted front end on the
# same endpoint gets its remote workers back.
FRONT_END_SILENT_S = 10.0
_PART_NAMES = ("answer", "rows")


class MalformedFrame(ValueError):
    """A message that is not one of these frames; whoever received it drops it."""


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
    """(header, rows or None, `Answer` or None) of a message's frames; `MalformedFrame` when they
    are not a message: no JSON object first, parts missing, unknown or extra, rows whose shape
    is not [rows, hidden] of their size, an answer that is not a `ContinueResponse`."""
    try:
        header = json.loads(frames[0])
    except (IndexError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MalformedFrame(f"no JSON header ({err})") from None
    if not isinstance(header, dict):
        raise MalformedFrame(f"the header is a JSON {type(header).__name__}, not an object")
    names = header.get("parts", [])
    if (not isinstance(names, list) or len(names) != len(frames) - 1
            or len(set(names)) != len(names) or not set(names) <= set(_PART_NAMES)):
        raise MalformedFrame(f"parts {names!r} do not name the {len(frames) - 1} frames after "
                             f"the header (each of {_PART_NAMES} at most once)")
    parts = dict(zip(names, frames[1:], strict=True))
    rows = answer = None
    if "rows" in parts:
        shape = header.get("shape")
        if not (isinstance(shape, list) and len(shape) == 2
                and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
                and shape[0] * shape[1] * 4 == len(parts["rows"])):
            raise MalformedFrame(f"rows of {len(parts['rows'])} bytes with shape {shape!r}: "
                                 f"not float32 [rows, hidden]")
        rows = np.frombuffer(parts["rows"], dtype="<f4").reshape(shape).astype(np.float32)
    if "answer" in parts:
        scores = header.get("scores", [])
        if not (isinstance(scores, list) and all(isinstance(v, int | float) for v in scores)):
            raise MalformedFrame(f"scores {scores!r} are not a list of numbers")
        try:
            answer = Answer.from_pb(tier_pb2.ContinueResponse.FromString(parts["answer"]))
        except Exception as err:  # noqa: BLE001 - protobuf raises several types on bad bytes
            raise MalformedFrame(f"the answer is not a ContinueResponse ({err})") from None
        answer.scores, answer.handoff = scores, rows
    return header, rows, answer


def error_header(err: Exception) -> dict:
    """A refusal as a header the front end turns back into the same error (`flow.status`)."""
    status = status_of(err) or status_of(TierError(f"{type(err).__name__}: {err}"))
    return {"error": {"code": status.code, "message": status.message,
                      "trailers": [list(t) for t in status.trailers]}}


def error_from_header(header: dict) -> Exception:
    """The error a worker reported with `error_header` (a `TierError` if it is unreadable)."""
    error = header.get("error")
    try:
        return error_of(error["code"], error["message"], [tuple(t) for t in error["trailers"]])
    except (KeyError, TypeError, ValueError):
        return TierError(f"an engine worker refused the request with an unreadable error: "
                         f"{str(error)[:200]}")
