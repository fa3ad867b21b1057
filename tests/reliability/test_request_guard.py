"""What a call must pass before the tier reads its message: an accepted token, a size the engine
limits allow, and bytes that parse — refused with the documented code, on every method, while
the tier keeps serving."""

import signal
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from cloud.engine import EngineLimits
from cloud.server import REFLECTION_V1
from cloud.server_config import ServerConfig
from cloud.service import ServerThread, TierSpec, largest_request_bytes
from flow.tier_client import GrpcTier
from flow.v1 import tier_pb2
from runs import start_flow_serve

TOKEN = "token-of-the-guarded-tier"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
# Not a message of any method here: a field 1 of wire type 7 (no such type).
GARBAGE = b"\x0f\xff\xff\xff\xff"
TIER_METHODS = ["OpenSession", "Continue", "Rollback", "CloseSession"]


@pytest.fixture(scope="module")
def guarded(device_family):
    family_dir, family = device_family
    server = ServerConfig(port=0, tokens=(TOKEN,))
    with ServerThread(TierSpec(family_dir, 0, None, server), family) as address:
        yield address


def _raw(channel, method: str, stream: bool = False):
    if stream:
        return channel.unary_stream(method)
    return channel.unary_unary(method)


@pytest.mark.parametrize("method", [*[f"/flow.v1.Tier/{m}" for m in TIER_METHODS],
                                    "/flow.v1.Tier/Generate", "/grpc.health.v1.Health/Check",
                                    "/grpc.health.v1.Health/List"])
def test_bytes_that_are_not_the_message_are_invalid_argument_on_every_method(guarded, method,
                                                                             device_family,
                                                                             reference):
    """Catches: gRPC's own answer to an unparsable message (UNKNOWN, with a traceback in the
    server's log) reaching a client as if the tier had failed."""
    channel = grpc.insecure_channel(guarded)
    call = _raw(channel, method, stream=method.endswith("Generate"))
    with pytest.raises(grpc.RpcError) as caught:
        answer = call(GARBAGE, metadata=AUTH, timeout=10)
        if method.endswith("Generate"):
            list(answer)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert method.rsplit("/", 1)[-1] in caught.value.details()
    channel.close()
    _still_serves(guarded, device_family, reference)


def test_reflection_answers_garbage_and_v1_alike(guarded):
    """Catches: reflection offered as v1alpha only (grpcurl and Postman ask for v1 first)."""
    channel = grpc.insecure_channel(guarded)
    for service in ("grpc.reflection.v1alpha.ServerReflection", REFLECTION_V1):
        info = channel.stream_stream(
            f"/{service}/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        (answer,) = info(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        names = {s.name for s in answer.list_services_response.service}
        assert {"flow.v1.Tier", "grpc.health.v1.Health"} <= names, service
        raw = channel.stream_stream(f"/{service}/ServerReflectionInfo")
        with pytest.raises(grpc.RpcError) as caught:
            list(raw(iter([GARBAGE]), timeout=10))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    channel.close()


def test_a_caller_without_a_token_is_refused_before_its_message_is_read(guarded):
    """Catches: the tier parsing (and holding) a message before it knows the caller: garbage
    from a stranger is UNAUTHENTICATED, not INVALID_ARGUMENT."""
    channel = grpc.insecure_channel(guarded)
    for method in TIER_METHODS:
        for metadata in ((), (("authorization", "Bearer not-the-token"),)):
            with pytest.raises(grpc.RpcError) as caught:
                _raw(channel, f"/flow.v1.Tier/{method}")(GARBAGE, metadata=metadata, timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, method
    health = channel.unary_unary("/grpc.health.v1.Health/Check",
                                 request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                                 response_deserializer=health_pb2.HealthCheckResponse.FromString)
    assert health(health_pb2.HealthCheckRequest(), timeout=10).status == \
        health_pb2.HealthCheckResponse.SERVING  # probes need no token
    channel.close()


def test_a_request_larger_than_the_limits_allow_is_refused_unread(guarded, device_family, reference):
    family = device_family[1]
    bound = largest_request_bytes(EngineLimits(), family.config)
    assert bound < 4 << 20  # sized from the limits, far below the old fixed 64 MiB
    channel = grpc.insecure_channel(guarded, options=[("grpc.max_send_message_length", -1)])
    oversized = tier_pb2.ContinueRequest(session_id="x", hidden=tier_pb2.Tensor(data=bytes(bound)))
    with pytest.raises(grpc.RpcError) as caught:
        channel.unary_unary("/flow.v1.Tier/Continue")(oversized.SerializeToString(), metadata=AUTH,
                                                      timeout=10)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    channel.close()
    _still_serves(guarded, device_family, reference)


def test_a_flood_of_oversized_requests_does_not_grow_the_server(device_family):
    """Catches: 16 concurrent 60 MiB requests (the largest valid one is under a megabyte) read
    whole into the server's memory, burst after burst (it grew to 2.5 GB), with or without a
    valid token."""
    family_dir, _ = device_family
    process, address = start_flow_serve(family_dir, 0)
    try:
        before = _peak_rss(process.pid)
        payload = bytes(60 << 20)
        channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", -1)])
        call = channel.unary_unary("/flow.v1.Tier/Continue")
        codes = []

        def send():
            try:
                call(payload, timeout=30)
            except grpc.RpcError as err:
                codes.append(err.code())

        for _ in range(2):  # two bursts: a ratchet shows in the second
            senders = [threading.Thread(target=send) for _ in range(16)]
            for sender in senders:
                sender.start()
            for sender in senders:
                sender.join(60)
        channel.close()
        time.sleep(0.5)
        growth = _peak_rss(process.pid) - before
        assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 32
        assert growth < 200 << 20, f"the server grew {growth >> 20} MiB"
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(30)


def _peak_rss(pid: int) -> int:
    """The process's peak resident memory (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _still_serves(address: str, device_family, reference) -> None:
    family = device_family[1]
    tier = GrpcTier(address, token=TOKEN)
    try:
        session = tier.open(family.family_hash(), 0)
        assert session.continue_(0, reference.rows, return_all=True).tokens == reference.tokens
        session.close()
    finally:
        tier.close()
