"""`ContinueStream` on a real server: answers in order as `Continue` would, refusals that end the
stream, and a client's fallback to a call each on a tier without it (fixtures: conftest.py); a
Generate its caller stops reading is cancelled."""

import threading
import time

import grpc
import pytest
from served import AUTH, PROMPTS, open_session, stub_channel

from device import DeviceClient
from flow.status import FRONTIER_KEY
from flow.tier_client import GrpcTier
from flow.v1 import tier_pb2, tier_pb2_grpc
from flow.wire import rows_to_tensor
from greedy import greedy


def test_a_stream_answers_each_request_as_continue_would_and_a_refusal_ends_it(device_family,
                                                                               stub):
    """Catches: stream answers out of order or for the wrong request, a refusal that does not
    end the stream with Continue's status and trailers, a message after a refusal that is still
    served, a refused message that moves the session, and a stream the guard lets through
    without a token or with bytes that are not a ContinueRequest."""
    family = device_family[1]
    prompt = PROMPTS[2]
    expected = greedy(family, 2, prompt, 4)
    rows = family.handoff(prompt + expected, exit=0)[0].numpy()
    session_id = open_session(stub, family).session_id
    n = len(prompt)

    def request(start: int, end: int) -> tier_pb2.ContinueRequest:
        return tier_pb2.ContinueRequest(session_id=session_id, start=start,
                                        hidden=rows_to_tensor(rows[start:end], "fp32"))

    answers = list(stub.ContinueStream(iter([request(0, n), request(n, n + 1),
                                             request(n + 1, n + 2)]), metadata=AUTH))
    assert [list(a.tokens) for a in answers] == [[t] for t in expected[:3]]
    assert [a.frontier for a in answers] == [n, n + 1, n + 2]
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.ContinueStream(iter([request(0, 1), request(n + 2, n + 3)]), metadata=AUTH))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert dict(caught.value.trailing_metadata())[FRONTIER_KEY] == str(n + 2)
    # the message after the refusal was not served: the session is still at n + 2
    answers = list(stub.ContinueStream(iter([request(n + 2, n + 3)]), metadata=AUTH))
    assert list(answers[0].tokens) == [expected[3]] and answers[0].frontier == n + 3

    with pytest.raises(grpc.RpcError) as caught:
        list(stub.ContinueStream(iter([request(n + 3, n + 4)])))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    raw = stub_channel(stub).stream_stream("/flow.v1.Tier/ContinueStream")
    with pytest.raises(grpc.RpcError) as caught:
        list(raw(iter([b"\xff\xff\xff"]), metadata=AUTH))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()


class UnaryOnlyTier(tier_pb2_grpc.TierServicer):
    """Test double of a tier without `ContinueStream` (it answers UNIMPLEMENTED, as gRPC does
    for a method a server does not know): forwards the unary session methods to `address`."""

    def __init__(self, address: str):
        self.stub = tier_pb2_grpc.TierStub(grpc.insecure_channel(address))

    def OpenSession(self, request, context):
        return self.stub.OpenSession(request, metadata=AUTH)

    def Continue(self, request, context):
        return self.stub.Continue(request, metadata=AUTH)

    def CloseSession(self, request, context):
        return self.stub.CloseSession(request, metadata=AUTH)


def test_a_client_falls_back_to_a_call_each_on_a_tier_without_streams(device_family, server):
    """Catches: a device that cannot use a tier without `ContinueStream` (UNIMPLEMENTED read
    as an error, or the first request lost in the fallback)."""
    from concurrent import futures

    family_dir, family = device_family
    proxy = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    tier_pb2_grpc.add_TierServicer_to_server(UnaryOnlyTier(server), proxy)
    port = proxy.add_insecure_port("127.0.0.1:0")
    proxy.start()
    try:
        tier = GrpcTier(f"127.0.0.1:{port}")
        client = DeviceClient(family_dir, exit=0, cloud=tier, mode="exit", threshold=1.5)
        result = client.complete(PROMPTS[0], max_new_tokens=6, ignore_eos=True)
        assert not any(result.offline)
        assert result.tokens == greedy(family, 2, PROMPTS[0], 6)
        assert tier.streaming is False
    finally:
        proxy.stop(None)


class EndlessTier(tier_pb2_grpc.TierServicer):
    """Test double of a tier whose Generate goes on until its caller cancels it (it ignores
    `max_new_tokens`): tokens 0, 1, 2, ...; `ended` is set when the call is over."""

    def __init__(self):
        self.ended = threading.Event()

    def Generate(self, request, context):
        context.add_callback(self.ended.set)
        token = 0
        while context.is_active():
            yield tier_pb2.GenerateResponse(token=token)
            token += 1
            time.sleep(0.01)


def test_a_generate_its_caller_stops_reading_is_cancelled():
    """Catches: a Generate left running on the tier after its caller stopped reading it (a
    device that has its tokens, or gave up, keeps the tier generating until the call's
    deadline)."""
    from concurrent import futures

    endless = EndlessTier()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    tier_pb2_grpc.add_TierServicer_to_server(endless, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    tier = GrpcTier(f"127.0.0.1:{port}", timeout=5.0)
    try:
        stream = tier.generate([1, 2, 3], max_new_tokens=1000)
        tokens = [next(stream) for _ in range(3)]
        assert not endless.ended.is_set()
        stream.close()
        assert endless.ended.wait(5), "the call still runs on the tier"
    finally:
        tier.close()
        server.stop(None)
    assert tokens == [0, 1, 2]
