"""The tier's gRPC service on a real port, talked to through real channels, over both engine
clients: the engine in the server's process and in two worker processes (`workers`)."""

import json
import re
import signal
import subprocess

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from served import AUTH, PROMPTS, TOKEN, open_session, stub_channel

from cloud.engine import EngineLimits
from cloud.server import ServerConfig
from cloud.service import ServerThread, TierSpec
from device import DeviceClient
from flow.errors import HashMismatchError
from flow.status import FRONTIER_KEY
from flow.tier import Exhausted, FrontierMismatch, InvalidRequest, SessionLost, TierUnavailable
from flow.tier_client import GrpcTier
from flow.v1 import tier_pb2, tier_pb2_grpc
from flow.wire import rows_to_tensor
from greedy import check_drafts_were_accepted_and_rejected, check_same_greedy, check_speculative, greedy
from runs import start_flow_serve


@pytest.mark.parametrize("mode, options", [("exit", {"threshold": 1.5}), ("cloud", {})])
def test_generations_through_the_service_are_the_full_model(device_family, server, mode, options):
    """Catches: a token the service answers that is not the full model's, a short stream."""
    family_dir, family = device_family
    client = DeviceClient(family_dir, exit=0, cloud=server, cloud_token=TOKEN, mode=mode, **options)
    near_ties = []
    for prompt in PROMPTS:
        result = client.complete(prompt, max_new_tokens=12, ignore_eos=True)
        assert not any(result.offline) and result.round_trips >= 1
        near_ties += check_same_greedy(family, 2, prompt, result.tokens, 12)
    assert near_ties == []


@pytest.fixture(scope="module")
def agreeing_server(agreeing_family, workers):
    family_dir, family = agreeing_family
    with ServerThread(TierSpec(family_dir, 0, None, ServerConfig(port=0), workers=workers),
                      family) as address:
        yield address


@pytest.mark.parametrize("draft_tokens", [1, 2, 3, 5, 8])
def test_speculative_through_the_service_is_the_full_model(agreeing_family, agreeing_server,
                                                           draft_tokens):
    """Catches: the engine not discarding a rejected draft's positions on `rollback=True` (its
    keys would be attended to), a verdict for the wrong row, and drafts never accepted."""
    family_dir, family = agreeing_family
    client = DeviceClient(family_dir, exit=0, cloud=agreeing_server, mode="speculative",
                          draft_tokens=draft_tokens)
    results = [client.complete(prompt, max_new_tokens=16, ignore_eos=True) for prompt in PROMPTS]
    near_ties = [t for prompt, result in zip(PROMPTS, results, strict=True)
                 for t in check_speculative(family, prompt, result, 16)]
    check_drafts_were_accepted_and_rejected(results)
    assert near_ties == []


def test_exit_mode_from_a_deeper_member_through_the_service(device_family, server):
    family_dir, family = device_family
    client = DeviceClient(family_dir, exit=1, cloud=server, cloud_token=TOKEN, mode="exit",
                          threshold=1.5)
    result = client.complete(PROMPTS[0], max_new_tokens=10, ignore_eos=True)
    assert result.tokens == greedy(family, 2, PROMPTS[0], 10)


@pytest.fixture(scope="module")
def narrow_server(device_family, workers):
    """A served family that takes at most 3 hand-off rows per request."""
    family_dir, family = device_family
    spec = TierSpec(family_dir, 0, EngineLimits(max_sessions=4, max_rows_per_request=3),
                    ServerConfig(port=0), workers=workers)
    with ServerThread(spec, family) as address:
        yield address


@pytest.mark.parametrize("streaming", [True, False], ids=["stream", "calls"])
def test_the_client_reads_every_refusal_as_its_protocol_error(device_family, narrow_server,
                                                              streaming):
    """Catches: RESOURCE_EXHAUSTED reaching the SDK as a bare `TierError` (a device would fail
    instead of backing off and going on locally), or any status read back as the wrong error;
    on a stream, a session that cannot go on after a refusal ended its stream, and a stream
    left open after the session closed."""
    family = device_family[1]
    tier = GrpcTier(narrow_server, streaming=streaming)
    session = tier.open(family.family_hash(), 0)
    assert session.max_rows == 3
    rows = family.handoff(PROMPTS[2], exit=0)[0].numpy()
    with pytest.raises(Exhausted, match="3 per request"):
        session.continue_(0, rows[:4])
    assert issubclass(Exhausted, TierUnavailable)
    with pytest.raises(FrontierMismatch) as caught:
        session.continue_(2, rows[:1])
    assert caught.value.frontier == 0
    with pytest.raises(InvalidRequest, match="hidden size"):
        session.continue_(0, rows[:1, :5])
    with pytest.raises(HashMismatchError):
        tier.open("0" * 64, 0)
    with pytest.raises(InvalidRequest, match="nothing after it"):
        tier.open(family.family_hash(), family.config.last_exit)
    session.continue_(0, rows[:3])
    session.close()
    with pytest.raises(SessionLost):
        session.continue_(3, rows[3:4])
    session = tier.open(family.family_hash(), 0)
    assert session.continue_(0, rows[:3]).frontier == 3
    stream = session._stream
    session.close()
    if streaming:  # closing the session ended its stream: the tier finished it, OK
        assert stream.call.code() == grpc.StatusCode.OK
    tier.close()


@pytest.mark.parametrize("mode, options", [("exit", {"threshold": 1.5}),
                                           ("speculative", {"draft_tokens": 5})])
def test_rows_beyond_what_the_tier_takes_go_in_several_requests(device_family, narrow_server,
                                                                 mode, options):
    """Catches: an escalation that sends more rows than the session's `max_rows` (every prompt
    longer than the limit would be refused, and the device would go offline), and verification
    answers from several requests put together at the wrong positions."""
    family_dir, family = device_family
    client = DeviceClient(family_dir, exit=0, cloud=narrow_server, mode=mode, **options)
    prompt = PROMPTS[2]  # 8 tokens: requests of 3, 3 and 2 rows
    result = client.complete(prompt, max_new_tokens=6, ignore_eos=True)
    assert not any(result.offline)
    assert check_same_greedy(family, 2, prompt, result.tokens, 6) == []
    if mode == "exit":
        assert result.round_trips == 3 + 5  # the prompt in 3 requests, then one per token


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
        ("empty prompt", "Generate", tier_pb2.GenerateRequest(
            family_hash=family.family_hash(), max_new_tokens=3), grpc.StatusCode.INVALID_ARGUMENT),
        ("token outside the vocabulary", "Generate", tier_pb2.GenerateRequest(
            family_hash=family.family_hash(), token_ids=[10**6], max_new_tokens=3),
         grpc.StatusCode.INVALID_ARGUMENT),
        ("generate without the family hash", "Generate",
         tier_pb2.GenerateRequest(token_ids=[1, 2], max_new_tokens=3), grpc.StatusCode.INVALID_ARGUMENT),
    ]


def call(stub, method, request, metadata=AUTH):
    if method == "Generate":
        return list(stub.Generate(request, metadata=metadata))
    return getattr(stub, method)(request, metadata=metadata)


class Sequence:
    """A session fed as a device would: the prompt's rows, then one row per answered token; each
    answer is checked against the full model's greedy output (rows recomputed by the reference)."""

    def __init__(self, stub, family, prompt, length):
        self.stub, self.prompt = stub, list(prompt)
        self.session_id = open_session(stub, family).session_id
        self.expected = greedy(family, 2, self.prompt, length)
        self.rows = family.handoff(self.prompt + self.expected, exit=0)[0].numpy()
        self.answered = 0

    def step(self) -> None:
        start = 0 if self.answered == 0 else len(self.prompt) + self.answered - 1
        end = len(self.prompt) + self.answered
        answer = self.stub.Continue(tier_pb2.ContinueRequest(
            session_id=self.session_id, start=start, hidden=rows_to_tensor(self.rows[start:end], "fp32")),
            metadata=AUTH)
        assert list(answer.tokens) == [self.expected[self.answered]], self.answered
        assert answer.frontier == end
        self.answered += 1


def test_every_validation_rule_answers_its_code_and_others_keep_working(device_family, stub):
    """Catches: a refused request that changes any session's state (the refused session's
    frontier or cache, or a bystander's), or an error that stops the service for others.

    A bystander generates a token after every bad request and is checked each time; the session
    the bad requests were aimed at is used afterwards and must answer from position 0."""
    family = device_family[1]
    hidden = family.config.hidden_size
    cases = None
    bystander = Sequence(stub, family, PROMPTS[0], 16)
    victim = Sequence(stub, family, PROMPTS[2], 3)
    bystander.step()
    cases = bad_requests(family, victim.session_id, hidden)
    for name, method, request, code in cases:
        with pytest.raises(grpc.RpcError) as caught:
            call(stub, method, request)
        assert caught.value.code() == code, (name, caught.value.details())
        assert caught.value.details(), name
        bystander.step()  # the bystander's next token is still the full model's
    for _ in range(3):
        victim.step()  # the refused requests left the victim at frontier 0, its cache intact
    assert bystander.answered == len(cases) + 1


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

    # Unguessable: 128 random bits per id (urlsafe base64), no shared prefixes, balanced bits.
    # A counter, a timestamp or a short id fails one of these.
    import base64

    ids = []
    for _ in range(200):
        session = open_session(stub, family)
        ids.append(session.session_id)
        stub.CloseSession(tier_pb2.CloseSessionRequest(session_id=session.session_id), metadata=AUTH)
    raw = [base64.urlsafe_b64decode(i + "=" * (-len(i) % 4)) for i in ids]
    assert all(len(r) >= 16 for r in raw)
    assert len({i[:8] for i in ids}) == len(ids)  # 48 bits of prefix: no two alike
    ones = sum(bin(int.from_bytes(r, "big")).count("1") for r in raw) / sum(8 * len(r) for r in raw)
    assert 0.47 < ones < 0.53, ones


def test_health_and_reflection(server):
    channel = grpc.insecure_channel(server)
    health = health_pb2_grpc.HealthStub(channel)
    status = health.Check(health_pb2.HealthCheckRequest(service="flow.v1.Tier"))
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    listed = health.List(health_pb2.HealthListRequest()).statuses
    assert {name: s.status for name, s in listed.items()} == {
        "": health_pb2.HealthCheckResponse.SERVING, "flow.v1.Tier": health_pb2.HealthCheckResponse.SERVING}
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
    # a message that does not parse is INVALID_ARGUMENT (cloud.guard); one that happens to
    # parse is an unknown session
    assert caught.value.code() in {grpc.StatusCode.NOT_FOUND,
                                   grpc.StatusCode.INVALID_ARGUMENT}, caught.value.details()
    stub.CloseSession(tier_pb2.CloseSessionRequest(session_id=session.session_id), metadata=AUTH)
    rows = family.handoff([1, 2], exit=0)[0].numpy()
    fresh = open_session(stub, family)
    stub.Continue(tier_pb2.ContinueRequest(session_id=fresh.session_id, start=0,
                                           hidden=rows_to_tensor(rows, "fp32")), metadata=AUTH)
    stub.CloseSession(tier_pb2.CloseSessionRequest(session_id=fresh.session_id), metadata=AUTH)


def test_flow_serve_process_serves_and_stops_cleanly(device_family, workers):
    family_dir, family = device_family
    process, address = start_flow_serve(family_dir, 0, "--from-exit", "0", "--log-format", "json",
                                        "--workers", workers)
    try:
        tier = GrpcTier(address)
        client = DeviceClient(family_dir, exit=0, cloud=tier, mode="exit", threshold=1.5)
        result = client.complete(PROMPTS[2], max_new_tokens=8, ignore_eos=True)
        assert result.tokens == greedy(family, 2, PROMPTS[2], 8) and result.round_trips == 8
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
def test_tls_and_mutual_tls(device_family, workers, tmp_path, mutual):
    family_dir, family = device_family
    key, cert = self_signed(tmp_path)
    config = ServerConfig(host="localhost", port=0, tls_key=key, tls_cert=cert,
                          client_ca=cert if mutual else None)
    with ServerThread(TierSpec(family_dir, 0, None, config, workers=workers), family) as address:
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


def test_metrics_count_requests_codes_rows_and_engine_state(device_family, workers):
    import urllib.request

    family_dir, family = device_family
    spec = TierSpec(family_dir, 0, None, ServerConfig(port=0), workers=workers)
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
    assert "flow_engine_step_rows_count" in text and "flow_engine_kv_cache_allocated_bytes" in text
    blocks = re.search(r'flow_engine_stage_seconds_total\{stage="blocks"\} (\S+)', text)
    assert blocks and float(blocks.group(1)) > 0, text
    check_metric_names(text)


def check_metric_names(text: str) -> None:
    """The conventions `promtool check metrics` enforces: `_total` only on counters, units as
    suffixes (bytes, seconds), help on every metric."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        name = family.name
        if name.endswith("_created"):  # the client library's standard creation timestamps
            continue
        assert family.documentation, name
        if family.type != "counter":
            assert not name.endswith("_total"), name
        for unit in ("bytes", "seconds"):
            if unit in name:
                assert name.endswith(f"_{unit}"), name


def test_a_session_answers_only_the_identity_that_opened_it(device_family, workers):
    family_dir, family = device_family
    spec = TierSpec(family_dir, 0, None, ServerConfig(port=0, tokens=("alice-token", "bob-token")),
                    workers=workers)
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


def stream_in_flight_at_shutdown(device_family, resume_worker: bool, grace_s: float) -> tuple[dict, float]:
    """Start a Generate on a tier whose one engine worker is stopped (SIGSTOP), so the stream is
    in flight with no token yet; then shut the tier down (`grace_s`) and, if `resume_worker`,
    let the worker go on (SIGCONT) 0.3 s into the grace period. Returns the caller's outcome
    and the seconds the shutdown took."""
    import os
    import threading
    import time

    family_dir, family = device_family
    thread = ServerThread(TierSpec(family_dir, 0, None, ServerConfig(port=0, grace_s=grace_s),
                                   workers=1), family)
    address = thread.start()
    (worker,) = thread.server.service.engine.workers.values()
    os.kill(worker.pid, signal.SIGSTOP)
    outcome, started = {}, threading.Event()

    def long_generation():
        tokens = outcome.setdefault("tokens", [])
        try:
            stream = GrpcTier(address, timeout=60).generate([1, 2, 3], 24,
                                                            family_hash=family.family_hash())
            started.set()
            for token in stream:
                tokens.append(token)
        except Exception as err:  # noqa: BLE001 - recorded for the assertions
            outcome["error"] = err

    caller = threading.Thread(target=long_generation)
    caller.start()
    started.wait(10)
    deadline = time.monotonic() + 10
    while not worker.pending and time.monotonic() < deadline:  # the call reached the pool
        time.sleep(0.01)
    assert worker.pending, "the stream never reached the worker"
    began = time.monotonic()
    stopper = threading.Thread(target=thread.stop)
    stopper.start()
    time.sleep(0.3)
    if resume_worker:
        os.kill(worker.pid, signal.SIGCONT)
    caller.join(30)
    if not resume_worker:
        os.kill(worker.pid, signal.SIGCONT)  # so that it can take its shutdown order
    stopper.join(30)
    assert not caller.is_alive() and not stopper.is_alive()
    with pytest.raises(TierUnavailable):
        GrpcTier(address, timeout=2).open(family.family_hash(), 0)  # nothing listens any more
    return outcome, time.monotonic() - began


def test_shutdown_lets_a_stream_in_flight_finish_within_the_grace_period(device_family):
    """Catches: a shutdown that cuts streams short although they could finish in the grace
    period, or that finishes them with wrong or missing tokens.

    Worker processes only: holding the stream in flight means stopping its engine (SIGSTOP of
    the worker), which an engine thread in the server's own process cannot be."""
    outcome, _ = stream_in_flight_at_shutdown(device_family, resume_worker=True, grace_s=20.0)
    assert "error" not in outcome, (len(outcome["tokens"]), outcome.get("error"))
    assert outcome["tokens"] == greedy(device_family[1], 2, [1, 2, 3], 24)


def test_shutdown_ends_a_stream_that_cannot_finish_as_unavailable(device_family):
    """Catches: a shutdown that waits forever on a stream, or ends it as a success with partial
    output: past the grace period the stream must end with UNAVAILABLE (`TierUnavailable`, the
    documented "go on without the tier" error), within seconds.

    Worker processes only, as the test above (the engine is held by SIGSTOP of its worker)."""
    outcome, seconds = stream_in_flight_at_shutdown(device_family, resume_worker=False, grace_s=1.0)
    assert outcome["tokens"] == [] and isinstance(outcome.get("error"), TierUnavailable), outcome
    assert seconds < 5
