"""What a call must pass before its message is read: the caller's identity, and a message that
parses.

`Identities` is the one home of bearer-token identity: which tokens a tier accepts and the owner
name each stands for (sessions are bound to it). `RequestGuard`, a server interceptor, runs before
gRPC reads a call's message: a `flow.v1.Tier` call without an accepted token is refused
UNAUTHENTICATED without its message being parsed, and bytes that are not the method's message
answer INVALID_ARGUMENT (gRPC alone answers UNKNOWN and logs a traceback) on every service of
the server, health and reflection included. How large a message may be is the server's
`max_receive_message_length`, sized from the engine limits (`ServerConfig.max_receive_bytes`).
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
from collections.abc import Callable, Sequence

import grpc

ANONYMOUS = "anonymous"  # every caller's name on a tier without tokens


class Identities:
    """The bearer tokens a tier accepts (none: no authentication, every caller is `ANONYMOUS`)."""

    def __init__(self, tokens: Sequence[str]):
        self._digests = [hashlib.sha256(token.encode()).digest() for token in tokens]

    def owner(self, metadata) -> str | None:
        """The caller's name (a digest of its token), from a call's invocation metadata; None
        when the token is missing or not accepted."""
        if not self._digests:
            return ANONYMOUS
        header = dict(metadata or ()).get("authorization", "")
        token = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        digest = hashlib.sha256(token.encode()).digest()
        if not token or not any(hmac.compare_digest(digest, d) for d in self._digests):
            return None
        return digest.hex()[:32]


UNAUTHENTICATED_MESSAGE = ("missing or unknown bearer token: send metadata "
                           "'authorization: Bearer <token>'")


class RequestGuard(grpc.aio.ServerInterceptor):
    """Refuse a protected service's call without an accepted token before reading its message,
    and answer a message that does not parse with INVALID_ARGUMENT, on every service.

    `protected` is the prefix of the methods that need a token ("/flow.v1.Tier/"); `on_refusal`
    (method name, status code name) counts what is refused here, before any servicer runs.
    """

    def __init__(self, identities: Identities, protected: str,
                 on_refusal: Callable[[str, str], None] | None = None):
        self.identities, self.protected, self.on_refusal = identities, protected, on_refusal
        self._parsing: dict[str, object] = {}  # per method: its parsing handler, built once

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None  # an unknown method: gRPC answers UNIMPLEMENTED
        method = details.method.rsplit("/", 1)[-1]
        if details.method.startswith(self.protected) and \
                self.identities.owner(details.invocation_metadata) is None:
            if self.on_refusal is not None:
                self.on_refusal(method, "UNAUTHENTICATED")
            return _refusing(handler, grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
        if details.method not in self._parsing:  # a method's handler is the same on every call
            self._parsing[details.method] = _parsing(handler, method, self.on_refusal)
        return self._parsing[details.method]


def _refusing(handler, code: grpc.StatusCode, message: str):
    """`handler`'s kind of method, answering `code` without parsing the request."""
    async def refuse(request_or_iterator, context):
        await context.abort(code, message)

    return _handler_like(handler, refuse)


def _parsing(handler, method: str, on_refusal):
    """`handler`, taking the request as bytes and parsing it itself: a message that does not
    parse is INVALID_ARGUMENT, not gRPC's UNKNOWN with a logged traceback."""
    parse = handler.request_deserializer
    if parse is None:
        return handler

    async def parsed(raw: bytes, context):
        try:
            return parse(raw)
        except Exception as err:  # noqa: BLE001 - whatever the parser raises, the bytes were bad
            if on_refusal is not None:
                on_refusal(method, "INVALID_ARGUMENT")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the request is not a {method} message ({type(err).__name__}); "
                                f"send the message flow.v1's protos define")

    async def each_parsed(raws, context):
        async for raw in raws:
            yield await parsed(raw, context)

    behavior = handler.unary_unary or handler.unary_stream or handler.stream_unary \
        or handler.stream_stream
    take = (parsed if handler.unary_unary or handler.unary_stream
            else lambda raws, context: _ready(each_parsed(raws, context)))
    if inspect.isasyncgenfunction(behavior):  # responses yielded
        async def run(request, context):
            async for response in behavior(await take(request, context), context):
                yield response
    else:  # one response returned, or responses written with context.write
        async def run(request, context):
            return await behavior(await take(request, context), context)
    return _handler_like(handler, run)


async def _ready(value):
    return value


def _handler_like(handler, behavior):
    """A method handler of `handler`'s kind running `behavior` on unparsed requests."""
    serialize = handler.response_serializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(behavior, None, serialize)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(behavior, None, serialize)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(behavior, None, serialize)
    return grpc.stream_stream_rpc_method_handler(behavior, None, serialize)
