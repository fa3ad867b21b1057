"""The gRPC front end of a tier: `flow.v1.Tier` on `grpc.aio`, over an engine client.

The front end decodes and checks what it can without the model (identity, family hash, tensor
encoding), hands the rest to the engine (which validates shapes, positions and frontiers against
its sessions) and turns every refusal into the status code the protocol documents, with a message
that says what to change. Nothing a request does can stop the service: an error answers that call
only (on a `ContinueStream`, it ends that stream). A stream's messages go through the same path
as `Continue` calls; they save grpc.aio's setup of a call per request, about half of what a
`Continue` call costs this front end (the `front end alone` rows of bench/cloud_throughput.py).
Health checking (`grpc.health.v1`) and server reflection are registered, so `grpcurl` and
standard probes work.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from cloud.engine.client import EngineClient
from cloud.guard import UNAUTHENTICATED_MESSAGE, Identities, RequestGuard
from cloud.server_config import ServerConfig
from flow.errors import ConfigError, HashMismatchError
from flow.status import status_of
from flow.tier import SamplingParams, TierError
from flow.v1 import tier_pb2, tier_pb2_grpc
from flow.wire import codec_name, tensor_to_rows

log = logging.getLogger("flow.cloud")
SERVICE_NAME = tier_pb2.DESCRIPTOR.services_by_name["Tier"].full_name
# grpcio-reflection implements v1alpha only; v1 is the same messages under a new name, which
# newer clients (grpcurl, Postman) ask first.
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


class _counted:
    """Count one RPC by status code and time it (to its last message, for a stream). A class,
    not a generator-based context manager: it runs around every call."""

    __slots__ = ("metrics", "method", "context", "began")

    def __init__(self, metrics, method: str, context):
        self.metrics, self.method, self.context = metrics, method, context
        self.began = time.perf_counter()

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, trace) -> bool:
        code = "OK" if kind is None else _code_name(self.context)
        self.metrics.observe_request(self.method, code, time.perf_counter() - self.began)
        return False


def _observed(rpc):
    @functools.wraps(rpc)
    async def wrapper(self, request, context):
        with _counted(self.metrics, rpc.__name__, context):
            return await rpc(self, request, context)
    return wrapper


def _observed_stream(rpc):
    @functools.wraps(rpc)
    async def wrapper(self, request, context):
        with _counted(self.metrics, rpc.__name__, context):
            async for message in rpc(self, request, context):
                yield message
    return wrapper


def _code_name(context) -> str:
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else "CANCELLED_OR_UNKNOWN"


class TierService(tier_pb2_grpc.TierServicer):
    """`flow.v1.Tier` for one family, over an engine client (`cloud.engine.client.EngineClient`:
    in process, in worker processes, or an edge's that forwards to the next tier)."""

    def __init__(self, engine: EngineClient, family_hash: str, vocab_size: int,
                 config: ServerConfig, max_rows: int, metrics=None):
        from cloud.metrics import TierMetrics

        self.engine = engine
        self.metrics = metrics or TierMetrics()
        self.family_hash = family_hash
        self.vocab_size = vocab_size
        self.config = config
        self.max_rows = max_rows
        self.identities = Identities(config.tokens)

    # ---- identity ---------------------------------------------------------------------------

    async def _owner(self, context: grpc.aio.ServicerContext) -> str:
        """Who is calling: a digest of the bearer token (sessions are bound to it). The server's
        `RequestGuard` refused a call without an accepted token before its message was read;
        this holds for a servicer registered without it too."""
        owner = self.identities.owner(context.invocation_metadata())
        if owner is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
        return owner

    def _check_family(self, family_hash: str) -> None:
        if family_hash != self.family_hash:
            raise HashMismatchError(
                f"this tier serves family {self.family_hash[:16]}…, the request names "
                f"{family_hash[:16] or '(none)'}…; deploy the same family on both tiers")

    # ---- RPCs -------------------------------------------------------------------------------

    @_observed
    async def OpenSession(self, request, context):
        owner = await self._owner(context)
        async with _status(context):
            self._check_family(request.family_hash)
            codec_name(request.codec)
            session_id, frontier = await self.engine.open_session(owner, int(request.from_exit))
        return tier_pb2.OpenSessionResponse(session_id=session_id, frontier=frontier,
                                            tier=self.config.name, max_rows=self.max_rows)

    @_observed
    async def Continue(self, request, context):
        owner = await self._owner(context)
        async with _status(context):
            return await self._continue(owner, request)

    async def ContinueStream(self, requests, context):
        """Continue, one answer per request on a stream the caller keeps open. Each message is
        counted and timed as a Continue call; a refusal ends the stream with its status."""
        owner = await self._owner(context)
        async for request in requests:
            with _counted(self.metrics, "Continue", context):
                async with _status(context):
                    answer = await self._continue(owner, request)
            yield answer

    async def _continue(self, owner: str, request) -> tier_pb2.ContinueResponse:
        rows = tensor_to_rows(request.hidden)
        self.metrics.rows_received.inc(len(rows))
        answer = await self.engine.continue_(
            request.session_id, owner, int(request.start), rows,
            return_all=request.returns == tier_pb2.RETURNS_ALL, top_k=int(request.top_k),
            rollback=request.rollback)
        return answer.to_pb(self.config.name)

    @_observed
    async def Rollback(self, request, context):
        owner = await self._owner(context)
        async with _status(context):
            frontier = await self.engine.rollback(request.session_id, owner, int(request.position))
        return tier_pb2.RollbackResponse(frontier=frontier)

    @_observed
    async def CloseSession(self, request, context):
        owner = await self._owner(context)
        async with _status(context):
            await self.engine.close(request.session_id, owner)
        return tier_pb2.CloseSessionResponse()

    @_observed_stream
    async def Generate(self, request, context):
        owner = await self._owner(context)
        async with _status(context):  # like OpenSession: tokens of another model are not answers
            self._check_family(request.family_hash)
        bad = [t for t in request.token_ids if not 0 <= t < self.vocab_size]
        if not request.token_ids or bad or request.max_new_tokens < 1:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "generate needs a non-empty prompt of token ids in "
                                f"0..{self.vocab_size - 1} (bad: {bad[:5]}) and max_new_tokens >= 1")
        params = SamplingParams.from_pb(request.sampling)
        async with _status(context):
            from flow.sampling import check_sampling

            check_sampling(params)
            index = 0
            async for token in self.engine.generate(owner, list(request.token_ids),
                                                    int(request.max_new_tokens), params,
                                                    tuple(request.stop_ids)):
                yield tier_pb2.GenerateResponse(token=token, index=index)
                index += 1


class _status:
    """Answer the protocol's errors (`flow.status`) with their status codes; anything else is a
    bug and reaches gRPC as UNKNOWN. (`async with _status(context):` around a call's work.)"""

    __slots__ = ("context",)

    def __init__(self, context: grpc.aio.ServicerContext):
        self.context = context

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, kind, error, trace) -> bool:
        if not isinstance(error, Exception):
            return False
        status = status_of(error)
        if status is None:
            return False
        await self.context.abort(grpc.StatusCode[status.code], status.message,
                                 trailing_metadata=status.trailers)
        return False


class TierServer:
    """A running `flow.v1.Tier` server: gRPC + health + reflection over an engine client."""

    def __init__(self, service: TierService, config: ServerConfig):
        self.service, self.config = service, config
        if isinstance(config.port, bool) or not isinstance(config.port, int) \
                or not 0 <= config.port <= 65535:
            raise ConfigError(f"port must be in 0..65535 (0 = any free port), got {config.port!r}")
        if config.tls_key is not None or config.tls_cert is not None:
            if not (config.tls_key and config.tls_cert):  # asked for TLS: never serve plaintext
                raise ConfigError("TLS needs both a certificate and its private key, and neither "
                                  "may be empty")
        if config.max_receive_bytes is None:
            raise ConfigError("max_receive_bytes must be sized (cloud.service.build sizes it "
                              "from the engine limits)")
        options = [("grpc.max_receive_message_length", config.max_receive_bytes),
                   ("grpc.max_send_message_length", config.max_send_bytes),
                   ("grpc.so_reuseport", 0),
                   # devices send keepalive pings (flow.tier_client) to notice a dead link early
                   ("grpc.keepalive_permit_without_calls", 1),
                   ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000)]
        metrics = service.metrics
        guard = RequestGuard(service.identities, f"/{SERVICE_NAME}/",
                             on_refusal=lambda method, code: metrics.count_request(method, code))
        self.server = grpc.aio.server(options=options, interceptors=[guard])
        tier_pb2_grpc.add_TierServicer_to_server(service, self.server)
        self.health = _HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        _enable_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
                           self.server)
        address = f"{config.host}:{config.port}"
        try:
            if config.tls_key and config.tls_cert:
                credentials = grpc.ssl_server_credentials(
                    [(config.tls_key, config.tls_cert)], root_certificates=config.client_ca,
                    require_client_auth=config.client_ca is not None)
                self.port = self.server.add_secure_port(address, credentials)
            else:
                self.port = self.server.add_insecure_port(address)
        except RuntimeError:  # grpcio raises where older versions returned port 0
            self.port = 0
        if not self.port:
            raise TierError(f"cannot listen on {address} (in use, or not an address of this host)")

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def start(self) -> None:
        await self.server.start()
        await self.set_serving(True)
        log.info("serving %s on %s", SERVICE_NAME, self.address)

    async def set_serving(self, serving: bool) -> None:
        """Health of the server and of `flow.v1.Tier`: SERVING, or NOT_SERVING when nothing can
        answer (no engine worker left, shutting down)."""
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", SERVICE_NAME):
            await _maybe_await(self.health.set(name, status))

    async def stop(self) -> None:
        """Stop taking calls, give in-flight ones `grace_s` to finish, then cancel the rest."""
        await self.set_serving(False)
        await self.server.stop(self.config.grace_s)

    async def wait(self) -> None:
        await self.server.wait_for_termination()


class _HealthServicer(health.aio.HealthServicer):
    """`grpc.health.v1.Health` with `List` as well (grpcio's asyncio servicer leaves it
    unimplemented): every service's status, as set through `set`."""

    def __init__(self):
        super().__init__()
        self._statuses = {"": health_pb2.HealthCheckResponse.SERVING}

    async def set(self, service: str, status) -> None:
        self._statuses[service] = status
        await super().set(service, status)

    async def List(self, request, context):
        return health_pb2.HealthListResponse(statuses={
            name: health_pb2.HealthCheckResponse(status=status) for name, status in self._statuses.items()})


def _enable_reflection(service_names, server: grpc.aio.Server) -> None:
    """Server reflection, v1alpha and v1 (one servicer: the two versions' messages are the
    same on the wire)."""
    servicer = reflection.aio.ReflectionServicer(service_names)
    for name in (reflection.SERVICE_NAME, REFLECTION_V1):
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)}),))


async def _maybe_await(result) -> None:
    if asyncio.iscoroutine(result):
        await result
