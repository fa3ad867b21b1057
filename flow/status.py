"""How the protocol's errors travel: one table from error to gRPC status code and back.

The gRPC server answers an error with `status_of(err)`, the gRPC client turns a failed call back
into the error with `error_of(...)`, and the engine workers' frames carry the same triple between
processes, so an error means the same thing on every hop. A status is a code *name* (a
`grpc.StatusCode` member's name), the message, and trailing metadata: `flow-error` names the
error exactly (several errors share INVALID_ARGUMENT), `flow-frontier` carries a
`FrontierMismatch`'s frontier. Needs neither grpc nor protobuf.
"""

from __future__ import annotations

from dataclasses import dataclass

from flow.codecs import CodecError
from flow.errors import ConfigError, HashMismatchError
from flow.tier import (
    Exhausted,
    FrontierMismatch,
    InvalidRequest,
    SessionLost,
    TierError,
    TierUnavailable,
)

# Trailing-metadata keys that carry what a status code alone cannot.
FRONTIER_KEY = "flow-frontier"  # FAILED_PRECONDITION: the session's frontier
ERROR_KIND_KEY = "flow-error"  # which error, e.g. "family-hash"


@dataclass(frozen=True)
class Status:
    """A refused call as it travels: status code name, message, trailing metadata."""

    code: str
    message: str
    trailers: tuple[tuple[str, str], ...] = ()


# (error, status code, flow-error kind), most specific first: the first row an error is an
# instance of decides its status.
_TABLE: tuple[tuple[type[Exception], str, str], ...] = (
    (FrontierMismatch, "FAILED_PRECONDITION", "frontier"),
    (SessionLost, "NOT_FOUND", "session-lost"),
    (Exhausted, "RESOURCE_EXHAUSTED", "exhausted"),
    (TierUnavailable, "UNAVAILABLE", "unavailable"),
    (HashMismatchError, "INVALID_ARGUMENT", "family-hash"),
    (InvalidRequest, "INVALID_ARGUMENT", "invalid"),
    (CodecError, "INVALID_ARGUMENT", "codec"),
    (ConfigError, "INVALID_ARGUMENT", "config"),
    (TierError, "INTERNAL", "tier"),
)
_BY_KIND = {kind: error for error, _, kind in _TABLE}
# What a code means when no flow-error says more (the status came from gRPC itself, e.g. a
# connection that failed, or a deadline that passed).
_BY_CODE = {"NOT_FOUND": SessionLost, "RESOURCE_EXHAUSTED": Exhausted,
            "UNAVAILABLE": TierUnavailable, "DEADLINE_EXCEEDED": TierUnavailable,
            "CANCELLED": TierUnavailable, "ABORTED": TierUnavailable,
            "INVALID_ARGUMENT": InvalidRequest}


def status_of(err: BaseException) -> Status | None:
    """The status answering `err`, or None when `err` is not an error of the protocol."""
    for error, code, kind in _TABLE:
        if isinstance(err, error):
            trailers = [(ERROR_KIND_KEY, kind)]
            if isinstance(err, FrontierMismatch):
                trailers.append((FRONTIER_KEY, str(err.frontier)))
            return Status(code, str(err), tuple(trailers))
    return None


def error_of(code: str, message: str, trailers=()) -> TierError | HashMismatchError:
    """The `flow.tier` error (or `HashMismatchError`) that a refused call's status stands for.

    A status with a `flow-error` kind came from a tier and is rebuilt as the same error with the
    same message (a codec or config error raised over there is an `InvalidRequest` here); one
    without came from gRPC itself and its message says which code it was.
    """
    trailers = dict(trailers or ())
    kind = trailers.get(ERROR_KIND_KEY)
    if kind == "frontier" or (code == "FAILED_PRECONDITION" and FRONTIER_KEY in trailers):
        return FrontierMismatch(message, int(trailers[FRONTIER_KEY]))
    if kind in _BY_KIND:
        error = _BY_KIND[kind]
        return (InvalidRequest if error in (CodecError, ConfigError) else error)(message)
    error = _BY_CODE.get(code, TierError)
    if issubclass(error, TierUnavailable):
        return error(f"next tier unavailable ({code}): {message}")
    return error(f"{code}: {message}")
