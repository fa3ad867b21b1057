"""The tier's gRPC service on a real port, talked to through real channels."""

import json
import signal
import subprocess
import sys

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud.engine import EngineLimits
from cloud.server import ServerConfig
from cloud.service import ServerThread, TierSpec
from device import DeviceClient
from flow.tier import TierUnavailable
from flow.tier_client import GrpcTier
from flow.v1 import tier_pb2, tier_pb2_grpc
from flow.wire import FRONTIER_KEY, rows_to_tensor
from greedy import check_same_greedy, greedy

PROMPTS = [[17, 3, 250, 9], [5], [100, 101, 102, 103, 104, 105, 106, 107], [42, 7, 42, 7, 42]]
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def server(device_family):
    """A served family with authentication, at a free port."""
    family_dir, family = device_family
    spec = TierSpec(family_dir, 0, EngineLimits(max_sessions=8, max_rows_per_request=64),
                    ServerConfig(port=0, tokens=(TOKEN,)))
    with ServerThread(spec, family) as address:
        yield address


@pytest.fixture
def stub(server):
    channel = grpc.insecure_channel(server)
    stub = tier_pb2_grpc.TierStub(channel)
    stub.channel = channel
    yield stub
    channel.close()


def stub_channel(stub) -> grpc.Channel:
    return stub.channel


AUTH = (("authorization", f"Bearer {TOKEN}"),)


def open_session(stub, family, from_exit=0):
    return stub.OpenSession(tier_pb2.OpenSessionRequest(family_hash=family.family_hash(),
                                                        from_exit=from_exit), metadata=AUTH)


@pytest.mark.parametrize("mode, options", [("exit", {"threshold": 1.5}),
                                           ("speculative", {"draft_tokens": 3}),
                                           ("cloud", {})])
def test_generations_through_the_service_are_the_full_model(device_family, server, mode, options):
    family_dir, family = device_family
    client = DeviceClient(family_dir, exit=0, cloud=server, cloud_token=TOKEN, mode=mode, **options)
    near_ties = []
    for prompt in PROMPTS:
        result = client.complete(prompt, max_new_tokens=12, ignore_eos=True)
        assert not any(result.offline) and result.round_trips >= 1
        check_same_greedy(family, 2, prompt, result.tokens, near_ties)
    print("near ties:", near_ties)


def test_exit_mode_from_a_deeper_member_through_the_service(device_family, server):
    family_dir, family = device_family
    client = DeviceClient(family_dir, exit=1, cloud=server, cloud_token=TOKEN, mode="exit",
                          threshold=1.5)
    result = client.complete(PROMPTS[0], max_new_tokens=10, ignore_eos=True)
    assert result.tokens == greedy(family, 2, PROMPTS[0], 10)


def bad_requests(family, session_id, hidden):
    """(name, method, request, expected code) for each validation rule."""
    rows = np.ones((2, hidden), np.float32)
    good = rows_to_tensor(rows, "fp32")
    nan = rows.copy()
    nan[1, 3] = np.nan
    return [
        ("wrong family", "OpenSession", tier_pb2.OpenSessionRequest(family_hash="0" * 64),
         grpc.StatusCode.INVALID_ARGUMENT),
        ("exit with nothing after it", "OpenSession",
         tier_pb2.OpenSessionRequest(family_hash=family.family_hash(), from_exit=2),
         grpc.StatusCode.INVALID_ARGUMENT),
        ("unknown codec", "OpenSession",
         tier_pb2.OpenSessionRequest(family_hash=family.family_hash(), codec=9),
         grpc.StatusCode.INVALID_ARGUMENT),
        ("payload of the wrong size", "Continue", tier_pb2.ContinueRequest(
            session_id=session_id, hidden=tier_pb2.Tensor(codec=1, shape=[2, hidden], data=b"xx")),
         grpc.StatusCode.INVALID_ARGUMENT),
        ("wrong hidden size", "Continue", tier_pb2.ContinueRequest(
            session_id=session_id, hidden=rows_to_tensor(np.ones((2, hidden + 1), np.float32), "fp32")),
         grpc.StatusCode.INVALID_ARGUMENT),
        ("non-finite values", "Continue", tier_pb2.ContinueRequest(
            session_id=session_id, hidden=rows_to_tensor(nan, "fp32")), grpc.StatusCode.INVALID_ARGUMENT),
        ("too many rows", "Continue", tier_pb2.ContinueRequest(
            session_id=session_id, hidden=rows_to_tensor(np.ones((65, hidden), np.float32), "fp32")),
         grpc.StatusCode.RESOURCE_EXHAUSTED),
        ("start beyond the frontier", "Continue", tier_pb2.ContinueRequest(
            session_id=session_id, start=5, hidden=good), grpc.StatusCode.FAILED_PRECONDITION),
        ("unknown session", "Continue", tier_pb2.ContinueRequest(session_id="nope", hidden=good),
         grpc.StatusCode.NOT_FOUND),
        ("empty prompt", "Generate", tier_pb2.GenerateRequest(max_new_tokens=3),
         grpc.StatusCode.INVALID_ARGUMENT),
        ("token outside the vocabulary", "Generate",
         tier_pb2.GenerateRequest(token_ids=[10**6], max_new_tokens=3), grpc.StatusCode.INVALID_ARGUMENT),
    ]


def call(stub, method, request, metadata=AUTH):
    if method == "Generate":
        return list(stub.Generate(request, metadata=metadata))
    return getattr(stub, method)(request, metadata=metadata)


def test_every_validation_rule_answers_its_code_and_others_keep_working(device_family, stub):
    family = device_family[1]
    hidden = family.config.hidden_size
    bystander = open_session(stub, family)
    prompt_rows = family.handoff(PROMPTS[0], exit=0)[0].numpy()
    victim = open_session(stub, family)
    for name, method, request, code in bad_requests(family, victim.session_id, hidden):
        with pytest.raises(grpc.RpcError) as caught:
            call(stub, method, request)
        assert caught.value.code() == code, (name, caught.value.details())
        assert caught.value.details(), name
        # the bystander's next request still gets the full model's answer
    answer = stub.Continue(tier_pb2.ContinueRequest(
        session_id=bystander.session_id, start=0, hidden=rows_to_tensor(prompt_rows, "fp32")),
        metadata=AUTH)
    assert list(answer.tokens) == greedy(family, 2, PROMPTS[0], 1)


def test_frontier_mismatch_carries_the_frontier(device_family, stub):
    family = device_family[1]
    session = open_session(stub, family)
    rows = family.handoff(PROMPTS[0], exit=0)[0].numpy()
    stub.Continue(tier_pb2.ContinueRequest(session_id=session.session_id, start=0,
                                           hidden=rows_to_tensor(rows, "fp32")), metadata=AUTH)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Continue(tier_pb2.ContinueRequest(session_id=session.session_id, start=2,
                                               hidden=rows_to_tensor(rows[:1], "fp32")), metadata=AUTH)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert dict(caught.value.trailing_metadata())[FRONTIER_KEY] == str(len(rows))


def test_authentication_and_session_ownership(device_family, stub):
    family = device_family[1]
    with pytest.raises(grpc.RpcError) as caught:
        stub.OpenSession(tier_pb2.OpenSessionRequest(family_hash=family.family_hash()))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as caught:
        stub.OpenSession(tier_pb2.OpenSessionRequest(family_hash=family.family_hash()),
                         metadata=(("authorization", "Bearer wrong"),))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    session = open_session(stub, family)
    assert len(session.session_id) >= 22  # unguessable


def test_health_and_reflection(server):
    channel = grpc.insecure_channel(server)
    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="flow.v1.Tier"))
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    responses = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"flow.v1.Tier", "grpc.health.v1.Health"} <= names
    channel.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.binary(max_size=256), shape=st.lists(st.integers(-3, 10**6), max_size=3),
       start=st.integers(0, 2**40), codec=st.integers(0, 6))
def test_random_bytes_and_shapes_never_break_the_server(device_family, stub, payload, shape, start, codec):
    family = device_family[1]
    session = open_session(stub, family)
    request = tier_pb2.ContinueRequest(session_id=session.session_id, start=start,
                                       hidden=tier_pb2.Tensor(codec=codec, shape=shape, data=payload))
    try:
        stub.Continue(request, metadata=AUTH)
    except grpc.RpcError as err:
        assert err.code() in {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                              grpc.StatusCode.RESOURCE_EXHAUSTED}, err.details()
    # and bytes that are not a ContinueRequest at all
    garbage = stub_channel(stub).unary_unary("/flow.v1.Tier/Continue")
    with pytest.raises(grpc.RpcError) as caught:
        garbage(payload + b"\xff\xff\xff", metadata=AUTH)
    # grpc itself answers a message it cannot parse (UNKNOWN, "Wire format was corrupt"); one
    # that happens to parse is an unknown session
    assert caught.value.code() in {grpc.StatusCode.UNKNOWN, grpc.StatusCode.NOT_FOUND,
                                   grpc.StatusCode.INVALID_ARGUMENT}, caught.value.details()
    stub.CloseSession(tier_pb2.CloseSessionRequest(session_id=session.session_id), metadata=AUTH)
    rows = family.handoff([1, 2], exit=0)[0].numpy()
    fresh = open_session(stub, family)
    stub.Continue(tier_pb2.ContinueRequest(session_id=fresh.session_id, start=0,
                                           hidden=rows_to_tensor(rows, "fp32")), metadata=AUTH)
    stub.CloseSession(tier_pb2.CloseSessionRequest(session_id=fresh.session_id), metadata=AUTH)


def test_flow_serve_process_serves_and_stops_cleanly(device_family):
    family_dir, family = device_family
    process = subprocess.Popen([sys.executable, "-m", "flow.cli.main", "serve", str(family_dir),
                                "--port", "0", "--from-exit", "0", "--log-format", "json"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert line.startswith("listening on "), (line, process.stderr.read() if process.poll() else "")
        address = line.split()[-1]
        tier = GrpcTier(address)
        client = DeviceClient(family_dir, exit=0, cloud=tier, mode="speculative", draft_tokens=4)
        result = client.complete(PROMPTS[2], max_new_tokens=8, ignore_eos=True)
        assert result.tokens == greedy(family, 2, PROMPTS[2], 8)
        tier.close()
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(30)
    logs = process.stderr.read()
    assert code == 0, logs[-2000:]
    records = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    assert any(r["message"].startswith("serving flow.v1.Tier") for r in records), logs[-2000:]


def self_signed(directory) -> tuple[bytes, bytes]:
    """A throwaway certificate for localhost (its own CA) and its key, made with openssl."""
    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return key.read_bytes(), cert.read_bytes()


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mutual-tls"])
def test_tls_and_mutual_tls(device_family, tmp_path, mutual):
    family_dir, family = device_family
    key, cert = self_signed(tmp_path)
    config = ServerConfig(host="localhost", port=0, tls_key=key, tls_cert=cert,
                          client_ca=cert if mutual else None)
    with ServerThread(TierSpec(family_dir, 0, None, config), family) as address:
        client_identity = {"private_key": key, "certificate_chain": cert} if mutual else {}
        tier = GrpcTier(address, root_certificates=cert, timeout=10, **client_identity)
        client = DeviceClient(family_dir, exit=0, cloud=tier, mode="exit", threshold=1.5)
        result = client.complete(PROMPTS[0], max_new_tokens=4, ignore_eos=True)
        assert result.tokens == greedy(family, 2, PROMPTS[0], 4) and result.round_trips == 4
        refused = [GrpcTier(address, timeout=5)]  # plaintext to a TLS port
        if mutual:
            refused.append(GrpcTier(address, root_certificates=cert, timeout=5))  # no client cert
        for other in refused:
            with pytest.raises(TierUnavailable):
                other.open(family.family_hash(), 0)


def test_metrics_count_requests_codes_rows_and_engine_state(device_family):
    import urllib.request

    family_dir, family = device_family
    spec = TierSpec(family_dir, 0, None, ServerConfig(port=0))
    spec.metrics_port = 0
    thread = ServerThread(spec, family)
    address = thread.start()
    try:
        client = DeviceClient(family_dir, exit=0, cloud=address, mode="exit", threshold=1.5)
        client.complete(PROMPTS[0], max_new_tokens=5, ignore_eos=True)
        with pytest.raises(grpc.RpcError):
            channel = grpc.insecure_channel(address)
            tier_pb2_grpc.TierStub(channel).Continue(tier_pb2.ContinueRequest(session_id="nope"))
        import time

        time.sleep(1.2)  # one stats poll
        port = thread.server.metrics_port
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        thread.stop()
    assert 'flow_requests_total{code="OK",method="Continue"} 5.0' in text
    assert 'flow_requests_total{code="INVALID_ARGUMENT",method="Continue"} 1.0' in text  # no tensor
    assert f"flow_rows_received_total {len(PROMPTS[0]) + 4}.0" in text, text
    assert "flow_engine_batch_rows_count" in text and "flow_engine_kv_bytes_total" in text


def test_a_session_answers_only_the_identity_that_opened_it(device_family):
    family_dir, family = device_family
    spec = TierSpec(family_dir, 0, None, ServerConfig(port=0, tokens=("alice-token", "bob-token")))
    with ServerThread(spec, family) as address:
        channel = grpc.insecure_channel(address)
        stub = tier_pb2_grpc.TierStub(channel)
        alice, bob = (("authorization", "Bearer alice-token"),), (("authorization", "Bearer bob-token"),)
        session = stub.OpenSession(tier_pb2.OpenSessionRequest(family_hash=family.family_hash()),
                                   metadata=alice)
        rows = rows_to_tensor(family.handoff(PROMPTS[0], exit=0)[0].numpy(), "fp32")
        request = tier_pb2.ContinueRequest(session_id=session.session_id, start=0, hidden=rows)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Continue(request, metadata=bob)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND  # as if it did not exist
        assert list(stub.Continue(request, metadata=alice).tokens) == greedy(family, 2, PROMPTS[0], 1)
        channel.close()


def test_shutdown_settles_in_flight_calls_and_stops(device_family):
    import threading
    import time

    family_dir, family = device_family
    thread = ServerThread(TierSpec(family_dir, 0, None, ServerConfig(port=0, grace_s=1.0)), family)
    address = thread.start()
    outcome = {}

    def long_generation():
        try:
            outcome["tokens"] = list(GrpcTier(address, timeout=60).generate([1, 2, 3], 80))
        except Exception as err:  # noqa: BLE001 - recorded for the assertion below
            outcome["error"] = err

    caller = threading.Thread(target=long_generation)
    caller.start()
    time.sleep(0.3)  # the stream is in flight
    began = time.monotonic()
    thread.stop()
    caller.join(30)
    assert not caller.is_alive() and time.monotonic() - began < 15
    # either it finished within the grace period, or it was told the tier went away
    assert len(outcome.get("tokens", [])) == 80 or isinstance(outcome.get("error"), TierUnavailable)
    with pytest.raises(TierUnavailable):
        GrpcTier(address, timeout=2).open(family.family_hash(), 0)  # nothing listens any more
