"""The ZeroMQ channel between the front end and its engine workers: a malformed message is
dropped on either side and the pool keeps serving; only a peer holding the worker key joins, and
a worker's reply counts only for the calls that were sent to it."""

import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
import zmq

from cloud.engine import EngineConfig
from cloud.engine.frames import pack, unpack
from cloud.engine.keys import WorkerKey
from cloud.engine.multiprocess import MultiprocessEngineClient
from flow.errors import ConfigError
from flow.tier import Answer
from runs import free_port

OWNER = "owner-of-the-forged-session"

# Messages that are not the channel's frames (`cloud.engine.frames`), each one way of being wrong.
MALFORMED = {
    "not JSON": [b"not json"],
    "an empty frame": [b""],
    "a JSON list": [b"[1, 2, 3]"],
    "rows of the wrong size": [json.dumps({"op": "continue", "id": 10**9, "parts": ["rows"],
                                           "shape": [2, 64]}).encode(), b"\0" * 12],
    "rows without a shape": [json.dumps({"op": "continue", "id": 10**9, "parts": ["rows"]}).encode(),
                             b"\0" * 8],
    "parts that are not there": [json.dumps({"id": 10**9, "parts": ["answer", "rows"]}).encode()],
    "an answer that is not protobuf": [json.dumps({"id": 10**9, "parts": ["answer"]}).encode(),
                                       b"\xff\xff\xff"],
}


@pytest.fixture(scope="module")
def pool(pools):
    return pools(2)


def dealer(pool, key=None, server_key=None) -> zmq.Socket:
    """A DEALER connected to the pool's ROUTER, a CURVE client with `key` (public, secret) and the
    server's public key `server_key` (default the pool's) when `key` is given."""
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    if key is not None:
        socket.curve_publickey, socket.curve_secretkey = key
        socket.curve_serverkey = server_key or pool.client.worker_key.public
    socket.connect(pool.endpoint)
    return socket


def with_the_worker_key(pool) -> zmq.Socket:
    key = pool.client.worker_key
    return dealer(pool, (key.public, key.secret))


def wait_for_dropped(pool, count: int) -> None:
    """Wait until the pool has dropped `count` malformed messages in all."""
    deadline = time.monotonic() + 5
    while pool.run(pool.client.stats())["dropped_frames"] < count:
        assert time.monotonic() < deadline, "the malformed message was never dropped"
        time.sleep(0.05)


@pytest.mark.parametrize("kind", MALFORMED)
def test_a_malformed_message_to_the_front_end_is_dropped(pool, reference, kind):
    """Catches: one malformed message on the worker channel ending the front end's receive loop,
    after which every worker is buried and every call fails or hangs."""
    peer = with_the_worker_key(pool)
    try:
        dropped = pool.run(pool.client.stats())["dropped_frames"]
        peer.send_multipart(MALFORMED[kind])
        wait_for_dropped(pool, dropped + 1)
        pool.check_every_worker_answers(reference)
    finally:
        peer.close()


@pytest.mark.parametrize("kind", [*MALFORMED, "a request without its fields", "no op"])
def test_a_malformed_message_to_a_worker_is_dropped(pool, reference, kind):
    """Catches: a malformed message (or a request missing its fields) killing the worker that
    receives it. The check's requests reach each worker after the message (one pipe keeps
    order)."""
    frames = {"a request without its fields": [json.dumps({"op": "open", "id": 10**9}).encode()],
              "no op": [json.dumps({"id": 10**9}).encode()]}.get(kind) or MALFORMED[kind]
    client = pool.client

    async def send_to_every_worker():
        for identity in client.workers:
            await client.socket.send_multipart([identity, *frames])

    pool.run(send_to_every_worker())
    pool.check_every_worker_answers(reference)
    assert len(client.workers) == 2


@pytest.mark.parametrize("credentials", ["no CURVE", "another key"])
def test_a_peer_without_the_worker_key_is_never_admitted(pool, reference, credentials):
    """Catches: any process that reaches the worker endpoint and says HELLO with the (public)
    family hash being welcomed as a worker, so that sessions and their tokens go through it."""
    key = zmq.curve_keypair() if credentials == "another key" else None
    intruder = dealer(pool, key)
    try:
        intruder.send_multipart(pack({"op": "hello", "family_hash": pool.client.family_hash,
                                      "pid": os.getpid()}))
        assert not intruder.poll(1500), "the intruder was answered"
        assert len(pool.client.workers) == 2
        pool.check_every_worker_answers(reference)  # every session on one of the two workers
    finally:
        intruder.close()


def join(pool) -> zmq.Socket:
    """A peer holding the worker key that joins the pool as a worker (HELLO, READY)."""
    peer = with_the_worker_key(pool)
    peer.send_multipart(pack({"op": "hello", "family_hash": pool.client.family_hash,
                              "pid": os.getpid()}))
    assert peer.poll(10_000), "the peer was not welcomed"
    header, _, _ = unpack(peer.recv_multipart())
    assert header["op"] == "welcome"
    before = len(pool.client.workers)
    peer.send_multipart(pack({"op": "ready", "pid": os.getpid()}))
    deadline = time.monotonic() + 5
    while len(pool.client.workers) == before:
        assert time.monotonic() < deadline, "the peer was not admitted"
        time.sleep(0.02)
    return peer


def test_a_worker_cannot_answer_for_another_nor_break_the_pool(pools, reference):
    """Catches: the front end taking a reply to a pending call from whichever worker names its
    id (a worker forging another's tokens), and a joined worker's malformed heartbeat ending the
    receive loop."""
    pool = pools(1)
    client = pool.client
    session_id, _ = pool.run(client.open_session(OWNER, 0))  # on the real worker
    (real,) = client.workers.values()
    forger = join(pool)
    try:
        os.kill(real.pid, signal.SIGSTOP)  # its answer waits until the forgery has arrived
        try:
            call = pool.submit(client.continue_(session_id, OWNER, 0, reference.rows,
                                                return_all=True, top_k=0, rollback=False))
            deadline = time.monotonic() + 5
            while not real.pending:
                assert time.monotonic() < deadline, "the call never reached the worker"
                time.sleep(0.005)
            (call_id,) = real.pending
            forged = Answer([0] * len(reference.tokens), len(reference.tokens))
            forger.send_multipart(pack({"id": call_id, "done": True}, answer=forged))
            time.sleep(0.5)
            assert not call.done(), "the forged answer was taken"
        finally:
            os.kill(real.pid, signal.SIGCONT)
        assert call.result(10).tokens == reference.tokens

        dropped = pool.run(client.stats())["dropped_frames"]
        forger.send_multipart([json.dumps({"op": "heartbeat", "stats": [1], "steps": 5}).encode()])
        wait_for_dropped(pool, dropped + 1)
        answer = pool.run(client.continue_(session_id, OWNER, 0, reference.rows, return_all=True,
                                           top_k=0, rollback=True))
        assert answer.tokens == reference.tokens
    finally:
        forger.close()


def test_a_tcp_front_end_admits_the_workers_given_the_operator_s_key(device_family, pools, reference,
                                                                    tmp_path):
    """Catches: a front end on tcp:// (reachable from other hosts) serving without a worker key,
    a key file that others may read being used, and a worker started by hand with the key file
    `python -m cloud.engine.keys` wrote not being admitted."""
    family_dir, family = device_family
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with pytest.raises(ConfigError, match="worker key"):
        MultiprocessEngineClient(endpoint, family.family_hash(), EngineConfig())

    key_file = tmp_path / "worker.key"
    subprocess.run([sys.executable, "-m", "cloud.engine.keys", str(key_file)], check=True,
                   capture_output=True)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    shared = tmp_path / "shared.key"
    shared.write_bytes(key_file.read_bytes())
    shared.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        WorkerKey.load(shared)

    pool = pools(0, endpoint, WorkerKey.load(key_file))
    worker = subprocess.Popen([sys.executable, "-m", "cloud.engine.worker", str(family_dir),
                               "--connect", endpoint, "--worker-key", str(key_file),
                               "--threads", "1"])
    try:
        deadline = time.monotonic() + 60
        while not pool.client.workers:
            assert worker.poll() is None, "the worker exited"
            assert time.monotonic() < deadline, "the worker was not admitted"
            time.sleep(0.05)
        pool.check_every_worker_answers(reference)
        pool.stop()  # tells the worker to shut down
        assert worker.wait(10) == 0
    finally:
        worker.kill()
