"""The gRPC client of a tier: `flow.tier.NextTier` over the `flow.v1.Tier` service.

A device (`DeviceClient(cloud="host:port")`) and an edge forwarding to the cloud use the same
client. A refused call becomes the error of `flow.tier` it stands for (`flow.status`), so callers
handle a network tier and the in-process reference tier alike: `TierUnavailable` (connection
failures, deadlines, UNAVAILABLE, and `Exhausted` for RESOURCE_EXHAUSTED: go on locally, retry
later), `SessionLost` (reopen, replay from 0), `FrontierMismatch`, `HashMismatchError`,
`InvalidRequest`, else `TierError` with the server's message.
"""

from __future__ import annotations

import queue
import threading
import time
import weakref
from collections.abc import Iterator

import grpc
import numpy as np

from flow.status import error_of
from flow.tier import Answer, SamplingParams, TierError, TierUnavailable
from flow.v1 import tier_pb2, tier_pb2_grpc
from flow.wire import CODEC_TO_PROTO, rows_to_tensor


def translate(err: grpc.RpcError) -> Exception:
    """The `flow.tier` error for a failed call."""
    return error_of(err.code().name, err.details() or "", err.trailing_metadata())


class GrpcTier:
    """A connection to a tier's gRPC service at `address` ("host:port").

    token: bearer token sent as `authorization` metadata. root_certificates (PEM bytes) turn on
    TLS; certificate_chain + private_key add a client certificate (mutual TLS). timeout: seconds
    per call, and for a streamed generate the longest wait for its next token: a tier that stops
    answering (frozen, or a link gone quiet) is `TierUnavailable` after that long, however long
    the generation. The channel sends keepalive pings, so a dead link is noticed while idle too.

    streaming: each session sends its requests on a `ContinueStream` it keeps open (gRPC holds a
    thread per open stream to send them), which costs the tier less per request than a call each;
    False, or a tier without that method, gets one `Continue` call per request. The answers are
    the same.
    """

    def __init__(self, address: str, token: str | None = None, timeout: float = 30.0,
                 root_certificates: bytes | None = None, private_key: bytes | None = None,
                 certificate_chain: bytes | None = None, options: list | None = None,
                 streaming: bool = True):
        self.address = address
        self.name = "cloud"
        self.timeout = timeout
        self.streaming = streaming
        self.watchdog = _Watchdog(tick=min(0.25, timeout / 4))
        self._streams: weakref.WeakSet[_ContinueStream] = weakref.WeakSet()  # open ones
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        options = options or [("grpc.max_receive_message_length", 64 << 20),
                              ("grpc.max_send_message_length", 64 << 20),
                              ("grpc.keepalive_time_ms", 20_000),
                              ("grpc.keepalive_timeout_ms", 10_000),
                              ("grpc.keepalive_permit_without_calls", 1),
                              # gRPC backs off reconnecting up to 120 s by default: a device whose
                              # link came back would stay offline that long. It retries on its own
                              # schedule (retry_interval), so the channel reconnects within 1 s.
                              ("grpc.initial_reconnect_backoff_ms", 200),
                              ("grpc.max_reconnect_backoff_ms", 1_000),
                              # ...but each attempt may take its time: gRPC reads its minimum
                              # connect timeout from this option, and a slow link needs more than
                              # a second to set up TCP and HTTP/2 (20 s is gRPC's default).
                              ("grpc.min_reconnect_backoff_ms", 20_000)]
        if root_certificates is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
            self.channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        self.stub = tier_pb2_grpc.TierStub(self.channel)

    def _call(self, method, request):
        try:
            return method(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise translate(err) from None

    def open(self, family_hash: str, from_exit: int, codec: str = "fp32") -> GrpcSession:
        if codec not in CODEC_TO_PROTO:
            raise TierError(f"unknown codec {codec!r}; choose one of {sorted(CODEC_TO_PROTO)}")
        answer = self._call(self.stub.OpenSession, tier_pb2.OpenSessionRequest(
            family_hash=family_hash, from_exit=from_exit, codec=CODEC_TO_PROTO[codec]))
        self.name = answer.tier or self.name
        return GrpcSession(self, answer.session_id, int(answer.frontier), codec, int(answer.max_rows))

    def generate(self, token_ids: list[int], max_new_tokens: int,
                 sampling: SamplingParams | None = None, stop_ids: tuple[int, ...] = (),
                 family_hash: str = "") -> Iterator[int]:
        """The tokens the tier generates after `token_ids`, as they come. Each is awaited at most
        `timeout` seconds, in the caller's thread (the tier's watchdog cancels a call left
        waiting): `TierUnavailable` after that. A caller that stops iterating early cancels the
        call, so the tier stops generating."""
        request = tier_pb2.GenerateRequest(
            family_hash=family_hash, token_ids=token_ids, max_new_tokens=max_new_tokens,
            stop_ids=list(stop_ids), sampling=(sampling or SamplingParams()).to_pb())
        call = self.stub.Generate(request, timeout=self.timeout * max(1, max_new_tokens),
                                  metadata=self._metadata)
        try:
            while True:
                try:
                    message = self.watchdog.next_message(
                        call, self.timeout, f"no token from {self.address} for {self.timeout:g} s")
                except StopIteration:
                    return
                except grpc.RpcError as err:
                    raise translate(err) from None
                yield message.token
        finally:
            call.cancel()  # a no-op once the stream ended; else the tier stops generating

    def close(self) -> None:
        for stream in list(self._streams):  # gRPC's threads sending their requests end too
            stream.close()
        self.channel.close()


_END = object()  # ends a ContinueStream's requests


class _Watchdog:
    """Cancels the calls whose next message is overdue: gRPC's blocking iterator takes no deadline
    per message. One thread per tier, asleep while no message is awaited, else looking every
    `tick` seconds (so a call is cancelled at most `tick` after its deadline)."""

    def __init__(self, tick: float):
        self.tick = tick
        self._lock = threading.Lock()
        self._due: dict[int, tuple[float, grpc.Call]] = {}  # by id(call): deadline, call
        self._cancelled: set[int] = set()  # ids of the awaited calls this watchdog cancelled
        self._awaited = threading.Event()
        self._thread: threading.Thread | None = None

    def next_message(self, call, seconds: float, overdue: str):
        """The next message of the streaming `call`, awaited in the caller's thread;
        `StopIteration` when the stream ended, the call's `grpc.RpcError` when it failed. When
        none came within `seconds` the call is cancelled and `TierUnavailable` says `overdue`."""
        key = id(call)
        with self._lock:
            self._due[key] = (time.monotonic() + seconds, call)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name="flow-watchdog")
                self._thread.start()
        self._awaited.set()
        try:
            return next(call)
        except grpc.RpcError:
            with self._lock:
                cancelled = key in self._cancelled
            if cancelled:
                raise TierUnavailable(f"next tier unavailable: {overdue}") from None
            raise
        finally:
            with self._lock:
                self._due.pop(key, None)
                self._cancelled.discard(key)

    def _run(self) -> None:
        while True:
            self._awaited.wait()
            time.sleep(self.tick)
            now = time.monotonic()
            with self._lock:  # a call whose wait ended meanwhile is out of _due: never cancelled
                for key, (due, call) in list(self._due.items()):
                    if due <= now:
                        del self._due[key]
                        self._cancelled.add(key)
                        call.cancel()
                if not self._due:
                    self._awaited.clear()


class _ContinueStream:
    """An open `ContinueStream`: `ask` sends one request and waits at most the tier's `timeout`
    for its answer, in the caller's thread (the tier's watchdog cancels a stream left waiting).
    After an error the stream is over; the session opens another."""

    def __init__(self, tier: GrpcTier):
        self.address, self.timeout, self.watchdog = tier.address, tier.timeout, tier.watchdog
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        # gRPC sends what this iterator yields from a thread of its own, for as long as it yields
        self.call = tier.stub.ContinueStream(iter(self._requests.get, _END), metadata=tier._metadata)
        self.answered = 0
        tier._streams.add(self)

    def ask(self, request) -> tier_pb2.ContinueResponse:
        """The answer to `request`; `TierUnavailable` when none came within `timeout` (the
        stream is cancelled, so the tier drops the request) or the tier ended the stream, the
        call's `grpc.RpcError` when it failed."""
        self._requests.put(request)
        try:
            answer = self.watchdog.next_message(
                self.call, self.timeout, f"no answer from {self.address} for {self.timeout:g} s")
        except StopIteration:
            raise TierUnavailable(f"next tier unavailable: {self.address} ended the stream "
                                  f"without answering") from None
        self.answered += 1
        return answer

    def close(self) -> None:
        """End the requests: the tier finishes the stream."""
        self._requests.put(_END)


class GrpcSession:
    """A `flow.tier.TierSession` held by a `GrpcTier`."""

    def __init__(self, tier: GrpcTier, session_id: str, frontier: int, codec: str, max_rows: int = 0):
        self.tier, self.session_id, self.frontier, self.codec = tier, session_id, frontier, codec
        self.max_rows = max_rows  # what the server accepts per request (0: it did not say)
        self._stream: _ContinueStream | None = None

    def continue_(self, start: int, rows: np.ndarray, return_all: bool = False, top_k: int = 0,
                  rollback: bool = False) -> Answer:
        tensor = rows_to_tensor(rows, self.codec)
        request = tier_pb2.ContinueRequest(
            session_id=self.session_id, start=start, hidden=tensor, top_k=top_k, rollback=rollback,
            returns=tier_pb2.RETURNS_ALL if return_all else tier_pb2.RETURNS_LAST)
        answer = Answer.from_pb(self._ask(request), bytes_sent=request.ByteSize())
        answer.tier = answer.tier or self.tier.name
        self.frontier = answer.frontier
        return answer

    def _ask(self, request) -> tier_pb2.ContinueResponse:
        """The tier's answer to a ContinueRequest, on this session's stream when streaming."""
        if not self.tier.streaming:
            return self.tier._call(self.tier.stub.Continue, request)
        if self._stream is None:
            self._stream = _ContinueStream(self.tier)
            # ends the stream when it is dropped, or when the session is (closed or not)
            self._end_stream = weakref.finalize(self, self._stream.close)
        stream = self._stream
        try:
            return stream.ask(request)
        except TierUnavailable:
            self._drop_stream()
            raise
        except grpc.RpcError as err:
            self._drop_stream()
            if err.code() == grpc.StatusCode.UNIMPLEMENTED and not stream.answered:
                self.tier.streaming = False  # a tier without ContinueStream: a call each
                return self.tier._call(self.tier.stub.Continue, request)
            raise translate(err) from None

    def _drop_stream(self) -> None:
        if self._stream is not None:
            self._end_stream()  # once: gRPC's thread sending the requests waits for the end
            self._stream = None

    def rollback(self, position: int) -> int:
        answer = self.tier._call(self.tier.stub.Rollback, tier_pb2.RollbackRequest(
            session_id=self.session_id, position=position))
        self.frontier = int(answer.frontier)
        return self.frontier

    def close(self) -> None:
        self._drop_stream()
        self.tier._call(self.tier.stub.CloseSession,
                        tier_pb2.CloseSessionRequest(session_id=self.session_id))
