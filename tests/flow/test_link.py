"""The link shaper measured from outside: round trips, throughput, cuts seen by gRPC, byte
counts, loss stalls, and `flow link` as a process."""

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from flow.cli.main import main
from flow.link import PROFILES, LinkShaper, Profile


@contextlib.contextmanager
def tcp_server(handle):
    """A loopback TCP server running `handle(connection)` in a thread per connection."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve(connection):
        with connection:
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with contextlib.suppress(OSError):
                handle(connection)

    def accept_forever():
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(connection,), daemon=True).start()

    threading.Thread(target=accept_forever, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        listener.close()


def echo(connection):
    while data := connection.recv(65536):
        connection.sendall(data)


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def receive_exactly(sock: socket.socket, nbytes: int) -> bytes:
    chunks, left = [], nbytes
    while left:
        chunk = sock.recv(min(left, 2**20))
        assert chunk, f"connection closed with {left} of {nbytes} bytes still to come"
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


SO_TIMESTAMPNS = 35  # Linux: stamp received data with the time it arrived (the socket module lacks it)


def receive_stamped(sock: socket.socket, nbytes: int) -> tuple[bytes, float]:
    """Up to `nbytes` (fewer at the end of the stream) and when the last of them reached the
    socket, by the kernel's stamp (the clock of time.time())."""
    chunks, left, arrived = [], nbytes, None
    while left:
        data, ancillary, _, _ = sock.recvmsg(left, socket.CMSG_SPACE(16))
        if not data:
            break
        for level, kind, value in ancillary:
            if (level, kind) == (socket.SOL_SOCKET, SO_TIMESTAMPNS):
                seconds, nanoseconds = struct.unpack("qq", value)
                arrived = seconds + nanoseconds * 1e-9
        chunks.append(data)
        left -= len(data)
    return b"".join(chunks), arrived


def stamped_echo(connection):
    """Echo 64-byte messages, each with the time it arrived and the time its echo left."""
    connection.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    while True:
        message, arrived = receive_stamped(connection, 64)
        if len(message) < 64:
            return
        connection.sendall(message[:48] + struct.pack("dd", arrived, time.time()))


def ping_ms(port: int, count: int) -> list[float]:
    """Round trips of `count + 1` pings on one fresh connection to a `stamped_echo`, in ms; the
    first pays the connection's handshake.

    Measured at the sockets, as ping(8) does: kernel receive stamps at both ends and send times
    taken just before sending, so the test threads' own wake-up delays on a busy machine (and
    the echo server's) are not counted — the shaper's are."""
    with connect(port) as sock:
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        times = []
        for i in range(count + 1):
            message = bytes([i % 256]) * 48 + bytes(16)
            sent = time.time()
            sock.sendall(message)
            reply, returned = receive_stamped(sock, 64)
            assert reply[:48] == message[:48]
            arrived, echoed = struct.unpack("dd", reply[48:])
            times.append(((arrived - sent) + (returned - echoed)) * 1000)
    return times


def wait_for(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize(("rtt_ms", "jitter_ms"), [(40, 0), (100, 0), (40, 10)])
def test_round_trip_time_matches_the_setting(rtt_ms, jitter_ms):
    """Each way adds rtt/2 plus uniform [0, jitter], so a round trip averages rtt + jitter.
    Catches: delay applied once instead of per direction, timers that fire late, Nagle or
    delayed ACKs adding their 40 ms, jitter ignored or in the wrong unit."""
    profile = Profile("t", rtt_ms=rtt_ms, jitter_ms=jitter_ms)
    with tcp_server(stamped_echo) as port, LinkShaper(("127.0.0.1", port), profile, seed=0) as link:
        _, *pings = ping_ms(link.port, count=10)
    expected = rtt_ms + jitter_ms
    assert abs(statistics.median(pings) - expected) <= 0.1 * expected + 2, pings
    if jitter_ms:
        assert max(pings) - min(pings) >= jitter_ms / 2, pings


def test_late_wakes_on_a_busy_machine_never_take_the_delay_away(monkeypatch):
    """The shaper wakes early by the lateness it has seen, at most 5 ms. Catches: an estimate
    that, after a burst of very late wakes, grows past the delay itself, after which the shaper
    stops sleeping (and so stops learning) and delivers everything at once."""
    real_sleep, stalls = asyncio.sleep, iter(range(12))

    async def stalled_sleep(delay, *args):  # the first 12 wakes come 60 ms late
        await real_sleep(delay + (0.06 if next(stalls, None) is not None else 0), *args)

    monkeypatch.setattr(asyncio, "sleep", stalled_sleep)
    with tcp_server(stamped_echo) as port, LinkShaper(("127.0.0.1", port), Profile("t", rtt_ms=40)) as link:
        pings = ping_ms(link.port, count=25)[1:]
    assert min(pings) >= 40 - 2 * 5 - 1, pings  # at most 5 ms early each way, even meanwhile
    assert statistics.median(pings[-10:]) >= 40 - 2, pings  # and no longer early once they pass


def test_a_new_connection_pays_the_handshake():
    """connect() returns at once on loopback; through a 40 ms link the first message still
    waits for the emulated three-way handshake, so its round trip takes two RTTs. Catches: a
    handshake that costs nothing, or one that costs a round trip per direction."""
    rtt_ms = 40
    with tcp_server(stamped_echo) as port, \
            LinkShaper(("127.0.0.1", port), Profile("t", rtt_ms=rtt_ms)) as link:
        firsts = [ping_ms(link.port, count=0)[0] for _ in range(5)]
    assert abs(statistics.median(firsts) - 2 * rtt_ms) <= 0.1 * 2 * rtt_ms + 2, firsts


@pytest.mark.parametrize("mbps", [2, 8])
def test_throughput_matches_the_bandwidth_each_way(mbps):
    """Two connections share each direction's link. Catches: bandwidth in bytes instead of bits,
    a limit per connection instead of per link, bursts that finish early."""
    nbytes = int(mbps * 1e6 / 8 * 1.2)  # 1.2 s worth, half on each connection
    half = random.Random(0).randbytes(nbytes // 2)
    done_at = []

    def sink(connection):
        receive_exactly(connection, len(half))
        done_at.append(time.perf_counter())

    def send_on_request(connection):
        connection.recv(1)
        connection.sendall(half)

    def fetch(sock):
        sock.sendall(b"?")
        assert receive_exactly(sock, len(half)) == half
        done_at.append(time.perf_counter())

    profile = Profile("t", up_mbps=mbps, down_mbps=mbps)
    measured = {}
    for direction, server, client in (("up", sink, lambda sock: sock.sendall(half)),
                                      ("down", send_on_request, fetch)):
        done_at.clear()
        with tcp_server(server) as port, LinkShaper(("127.0.0.1", port), profile) as link:
            sockets = [connect(link.port), connect(link.port)]
            start = time.perf_counter()
            with ThreadPoolExecutor(2) as pool:
                list(pool.map(client, sockets))
            wait_for(lambda: len(done_at) == 2)
            for sock in sockets:
                sock.close()
        measured[direction] = 2 * len(half) * 8 / (max(done_at) - start) / 1e6
    assert abs(measured["up"] - mbps) <= 0.15 * mbps, measured
    assert abs(measured["down"] - mbps) <= 0.15 * mbps, measured


def test_a_cut_is_unavailable_to_grpc_and_calls_succeed_after_it():
    """Catches: a cut that only stalls (the client would see DEADLINE_EXCEEDED, not UNAVAILABLE),
    a cut that never ends, connections accepted and carried during a cut."""
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    cut_at, cut_for = 1.0, 1.0
    # A short reconnect backoff: gRPC's default (1 s, growing) would outlast the test, not the cut.
    options = [("grpc.enable_http_proxy", 0), ("grpc.initial_reconnect_backoff_ms", 100),
               ("grpc.min_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 100)]
    serving = health_pb2.HealthCheckResponse.SERVING
    try:
        with LinkShaper(("127.0.0.1", port), Profile("t", rtt_ms=10), cuts=[(cut_at, cut_for)]) as link:
            started = time.monotonic()
            with grpc.insecure_channel(link.address, options=options) as channel:
                check = health_pb2_grpc.HealthStub(channel).Check
                assert check(health_pb2.HealthCheckRequest(), timeout=cut_at * 0.9).status == serving
                time.sleep(max(0.0, started + cut_at + 0.3 - time.monotonic()))
                with pytest.raises(grpc.RpcError) as failure:
                    check(health_pb2.HealthCheckRequest(), timeout=0.5)
                assert failure.value.code() == grpc.StatusCode.UNAVAILABLE, failure.value
                assert time.monotonic() < started + cut_at + cut_for, "too slow to test inside the cut"
                time.sleep(max(0.0, started + cut_at + cut_for + 0.1 - time.monotonic()))
                response = check(health_pb2.HealthCheckRequest(), timeout=3, wait_for_ready=True)
                assert response.status == serving
            ends = [c.end for c in link.connections]
    finally:
        server.stop(None)
    assert ends[0] == "cut" and "refused" in ends, ends


def test_byte_counters_equal_what_the_client_sent_and_received(tmp_path):
    """Catches: counting reads instead of deliveries, counting a direction twice, totals that
    miss a connection, a stats file that disagrees with the object."""
    rng = random.Random(1)
    sent = received = 0
    with tcp_server(echo) as port, LinkShaper(("127.0.0.1", port), PROFILES["lan"]) as link:
        for sizes in ([1, 1000, 70_000], [5, 300_000]):
            with connect(link.port) as sock:
                for size in sizes:
                    message = rng.randbytes(size)
                    sock.sendall(message)
                    received += len(receive_exactly(sock, size))
                    sent += size
        wait_for(lambda: all(c.end == "closed" for c in link.connections))
        assert [c.bytes_up for c in link.connections] == [71_001, 300_005]
        link.write_stats(tmp_path / "stats.json")
    assert (link.bytes_up, link.bytes_down) == (sent, received) == (371_006, 371_006)
    assert [c.bytes_down for c in link.connections] == [71_001, 300_005]
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert (stats["bytes_up"], stats["bytes_down"]) == (sent, received)
    assert [c["bytes_up"] for c in stats["connections"]] == [71_001, 300_005]


def test_bytes_a_cut_throws_away_are_not_counted():
    """Catches: counting bytes when they are read rather than when they cross, so that a cut
    (which drops what is still on the emulated wire) leaves the counter ahead of the server."""
    got = []

    def count_until_reset(connection):
        total = 0
        try:
            while data := connection.recv(65536):
                total += len(data)
        finally:
            got.append(total)

    profile = Profile("t", rtt_ms=40, up_mbps=0.8)  # 100 kB/s: 0.3 s carries about 30 kB
    with tcp_server(count_until_reset) as port, \
            LinkShaper(("127.0.0.1", port), profile, cuts=[(0.3, 0.2)]) as link:
        with connect(link.port) as sock:
            with contextlib.suppress(OSError):
                sock.sendall(bytes(100_000))
            wait_for(lambda: got)
    assert 5_000 < got[0] < 40_000, got
    assert link.bytes_up == link.connections[0].bytes_up == got[0]
    assert link.connections[0].end == "cut"


def test_loss_stalls_some_round_trips_and_delivers_every_byte_in_order():
    """Catches: loss that drops bytes (TCP would resend them), a stall shorter than the
    retransmission timeout, chunks reordered by their different delays."""
    profile = Profile("t", rtt_ms=20, jitter_ms=2, loss=0.1)
    stall_ms = profile.stall_ms
    assert stall_ms == 200  # Linux's minimum RTO beats RTT + 4 x jitter here
    payload = random.Random(2).randbytes(400_000)
    with tcp_server(stamped_echo) as port, LinkShaper(("127.0.0.1", port), profile, seed=3) as link:
        _, *pings = ping_ms(link.port, count=30)
    with tcp_server(echo) as port, LinkShaper(("127.0.0.1", port), profile, seed=4) as link:
        with connect(link.port) as sock:
            sender = threading.Thread(target=sock.sendall, args=(payload,))
            sender.start()
            echoed = receive_exactly(sock, len(payload))
            sender.join()
    assert echoed == payload
    stalled = [t for t in pings if t >= stall_ms]
    assert 2 <= len(stalled) <= 15, pings  # P(a ping stalls) = 1 - 0.9^2 = 0.19


def test_cli_rejects_an_unknown_profile_in_one_line(capsys):
    assert main(["link", "--listen", "127.0.0.1:0", "--to", "127.0.0.1:9", "--profile", "nosuch"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert all(name in lines[0] for name in PROFILES), lines
    assert main(["link", "--listen", "127.0.0.1:0", "--to", "127.0.0.1:9",
                 "--cut-at", "1,5", "--cut-for", "1,2,3"]) == 1
    assert "--cut-at and --cut-for must pair up" in capsys.readouterr().err


def test_cli_forwards_a_connection_and_stops_on_ctrl_c(tmp_path):
    """Started with SIGINT ignored, as a shell starts background jobs (and CI ran this test once):
    Ctrl-C must still stop it."""
    with tcp_server(echo) as port:
        process = subprocess.Popen(
            [sys.executable, "-m", "flow.cli.main", "link", "--listen", "127.0.0.1:0",
             "--to", f"127.0.0.1:{port}", "--profile", "wifi", "--loss", "0",
             "--stats", str(tmp_path / "stats.json")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
        killer = threading.Timer(30, process.kill)  # never hang the suite on a stuck process
        killer.start()
        try:
            line = process.stdout.readline()
            listening = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
            assert listening, (line, process.stderr.read() if process.poll() is not None else "")
            assert "RTT 20 ms" in line and "up 30 Mbit/s" in line and "loss 0 %" in line, line
            with connect(int(listening[1])) as sock:
                sock.sendall(b"x" * 1000)
                assert receive_exactly(sock, 1000) == b"x" * 1000
            process.send_signal(signal.SIGINT)
            _, stderr = process.communicate(timeout=20)
        finally:
            killer.cancel()
            process.kill()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr, stderr
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert (stats["bytes_up"], stats["bytes_down"]) == (1000, 1000), stats
    assert stats["profile"]["name"] == "wifi (custom)" and stats["profile"]["loss"] == 0
