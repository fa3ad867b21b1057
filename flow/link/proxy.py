"""`LinkShaper`: a user-space TCP proxy that gives a loopback connection the shape of a real link.

The kernel here has no netem, so the shaping happens between two sockets: every chunk read from
one side is given the time it would reach the other side over the link (`Direction.arrival`),
and a writer hands it over at that time. A direction's link is shared by every connection, bytes
of a connection stay in order, and nothing is dropped (see `flow.link.profiles` for the model).

Timing holds on a busy machine, where the shaper's thread runs milliseconds after it should: a
chunk's delay counts from when the kernel received it (its SO_TIMESTAMPNS stamp), not from when
the thread got round to reading it, and sleeps end early by the lateness seen lately (`_Clock`).

During a cut the shaper resets every connection it carries and each new one as it arrives, so a
gRPC client sees UNAVAILABLE rather than a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import random
import socket
import statistics
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from flow.errors import FlowError
from flow.fsutil import atomic_file
from flow.link.profiles import PROFILES, Direction, Profile

QUEUE_S = 0.1  # the bottleneck's buffer: reading pauses while a direction is booked further ahead
MAX_IN_FLIGHT = 4 * 2**20  # bytes a connection's direction may hold (unlimited bandwidth, long delay)
LATENESS_WINDOW = 31  # a `_Clock` goes by the median lateness of this many recent wakes,
MAX_EARLY_S = 0.005  # but never wakes more than this early
SO_TIMESTAMPNS = 35  # Linux, as SIOCOUTQNSD: stamp received data with its arrival (CLOCK_REALTIME)
SIOCOUTQNSD = 0x894B  # ioctl: bytes in a socket's send queue that were not sent yet
STAMP_SPACE = socket.CMSG_SPACE(16)  # room for one struct timespec


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class ConnectionStats:
    """One connection through the shaper; times in seconds since the shaper started listening.

    `bytes_up` / `bytes_down` count what was handed on to the server / the client. `end` is
    open, closed (both sides finished), reset (a side reset it), cut (dropped by a cut), refused
    (arrived during a cut), unreachable (the target refused it) or shutdown (the shaper stopped).
    """

    client: str
    opened_at: float
    closed_at: float | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    end: str = "open"


class _Clock:
    """Sleeps until a deadline, shortened by the typical lateness lately (the median, so that
    most deliveries are on time whatever the outliers): a thread wakes late, by milliseconds when
    other tasks hold the CPUs (the scheduler lets them finish their slice)."""

    def __init__(self) -> None:
        self.lateness, self.recent = 0.0, deque(maxlen=LATENESS_WINDOW)  # seconds

    async def sleep_until(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        wake_at = deadline - self.lateness
        if wake_at > loop.time():
            await asyncio.sleep(wake_at - loop.time())
            self.recent.append(loop.time() - wake_at)
            self.lateness = min(statistics.median(self.recent), MAX_EARLY_S)


class _Socket:
    """A non-blocking TCP socket whose reads carry their kernel arrival time and whose writes
    count exactly the bytes the kernel took."""

    def __init__(self, sock: socket.socket):
        self.sock, self.loop = sock, asyncio.get_running_loop()
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no Nagle wait on small writes
        with contextlib.suppress(OSError):  # without stamps, arrival is when the read happens
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)

    async def _ready(self, add: Callable, remove: Callable) -> None:
        fd, waiter = self.sock.fileno(), self.loop.create_future()
        add(fd, lambda: waiter.done() or waiter.set_result(None))
        try:
            await waiter
        finally:
            if self.sock.fileno() == fd:  # once closed, the number may be another socket's
                remove(fd)

    async def recv(self, size: int) -> tuple[bytes, float]:
        """Up to `size` bytes (b"" at the end of the stream) and when they arrived, in loop time."""
        while True:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(size, STAMP_SPACE)
            except BlockingIOError:
                await self._ready(self.loop.add_reader, self.loop.remove_reader)
                continue
            now = self.loop.time()
            for level, kind, value in ancillary:
                if (level, kind) == (socket.SOL_SOCKET, SO_TIMESTAMPNS):
                    seconds, nanoseconds = struct.unpack("qq", value)
                    return data, min(now, now - time.time() + seconds + nanoseconds * 1e-9)
            return data, now

    async def send(self, data: bytes, count: Callable[[int], None]) -> None:
        view = memoryview(data)
        while view:
            try:
                sent = self.sock.send(view)
            except BlockingIOError:
                await self._ready(self.loop.add_writer, self.loop.remove_writer)
                continue
            count(sent)
            view = view[sent:]

    def close(self, reset: bool) -> int:
        """Close, with a TCP RST when `reset` (a dropped link); returns the bytes the kernel took
        but had not sent (autocorking holds some on a busy machine), which a reset throws away."""
        fd = self.sock.fileno()
        if fd < 0:
            return 0
        self.loop.remove_reader(fd)
        self.loop.remove_writer(fd)
        unsent = 0
        if reset:
            with contextlib.suppress(OSError):
                unsent = struct.unpack("i", fcntl.ioctl(fd, SIOCOUTQNSD, bytes(4)))[0]
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()
        return unsent


class _Pipe:
    """One direction of one connection: chunks timed by the link, written at that time, in order."""

    def __init__(self, source: _Socket, sink: _Socket, direction: Direction,
                 count: Callable[[int], None], clock: _Clock, accepted: float, handshake_s: float):
        self.source, self.sink, self.direction, self.count = source, sink, direction, count
        self.clock, self.connected_at, self.handshake_s = clock, accepted, handshake_s
        # (deliver at, data), b"" the end: first in, first out, so no chunk overtakes another
        self.pending: deque[tuple[float, bytes]] = deque()
        self.pending_bytes = 0
        self.arrived, self.drained = asyncio.Event(), asyncio.Event()

    async def read(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            booked_ahead = self.direction.free_at - loop.time() - QUEUE_S
            if booked_ahead > 0:
                await asyncio.sleep(booked_ahead)
                continue
            if self.pending_bytes >= MAX_IN_FLIGHT:
                self.drained.clear()
                await self.drained.wait()
                continue
            data, arrived = await self.source.recv(self.direction.read_size)
            # The thread may accept late on a busy machine; no byte arrives before its connection.
            self.connected_at = min(self.connected_at, arrived)
            sent = max(arrived, self.connected_at + self.handshake_s)  # bytes wait for the handshake
            at = self.direction.arrival(sent, len(data)) if data else sent + self.direction.one_way_s
            self.pending.append((at, data))
            self.pending_bytes += len(data)
            self.arrived.set()
            if not data:
                return

    async def write(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.pending:
                self.arrived.clear()
                await self.arrived.wait()
                continue
            head_at = self.pending[0][0]
            await self.clock.sleep_until(head_at)
            if not self.pending[0][1]:  # the sender's FIN, passed on as a half-close
                self.sink.sock.shutdown(socket.SHUT_WR)
                return
            due, chunks = max(head_at, loop.time()), []
            while self.pending and self.pending[0][1] and self.pending[0][0] <= due:
                chunks.append(self.pending.popleft()[1])
            data = b"".join(chunks)
            await self.sink.send(data, self.count)
            self.pending_bytes -= len(data)
            self.drained.set()


class LinkShaper:
    """A TCP proxy from `listen` to `target` shaped by `profile`, running in a background thread.

    `cuts` are (at, for) pairs in seconds since listening began: from `at` for `for` seconds
    every connection is reset and new ones are reset on arrival. `seed` makes jitter and loss
    reproducible. Use it as a context manager, or `start()` / `close()`:

        with LinkShaper(target=("127.0.0.1", 50051), profile=PROFILES["4g"]) as link:
            channel = grpc.insecure_channel(f"127.0.0.1:{link.port}")
    """

    def __init__(self, target: tuple[str, int], profile: Profile = PROFILES["none"], *,
                 listen: tuple[str, int] = ("127.0.0.1", 0),
                 cuts: Iterable[tuple[float, float]] = (), seed: int | None = None):
        self.target, self.profile, self.listen = (target[0], int(target[1])), profile, listen
        self.cuts = sorted((float(at), float(length)) for at, length in cuts)
        for at, length in self.cuts:
            if not (at >= 0 and length > 0):
                raise FlowError(f"a link cut needs a start >= 0 s and a length > 0 s, got at {at} "
                                f"for {length}")
        rng = random.Random(seed)
        self._up = Direction(profile.up_mbps, profile, rng)
        self._down = Direction(profile.down_mbps, profile, rng)
        self._clock = _Clock()
        self.connections: list[ConnectionStats] = []
        self.port: int | None = None
        self._live: dict[asyncio.Task, tuple[ConnectionStats, Callable[[], None]]] = {}
        self._carrying: set[asyncio.Task] = set()  # every connection task, live or finishing
        self._cuts_active = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready, self._stopped = threading.Event(), threading.Event()
        self._failure: BaseException | None = None

    @property
    def bytes_up(self) -> int:
        """Bytes handed on to the target (client to server), over all connections."""
        return sum(c.bytes_up for c in list(self.connections))

    @property
    def bytes_down(self) -> int:
        """Bytes handed on to clients (server to client), over all connections."""
        return sum(c.bytes_down for c in list(self.connections))

    @property
    def address(self) -> str:
        """Where clients connect, as HOST:PORT."""
        return format_address(self.listen[0], self.port)

    def start(self) -> LinkShaper:
        """Listen and serve in a background thread; returns once `port` is known."""
        if self._thread is not None:
            raise RuntimeError("a LinkShaper starts once")
        self._thread = threading.Thread(target=self._run, name="link-shaper", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._failure is not None:
            self._thread.join()
            raise FlowError(f"cannot listen on {format_address(*self.listen)}: {self._failure}; "
                            f"choose another address or port") from self._failure
        return self

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the shaper has stopped (or `timeout` seconds); whether it has."""
        return self._stopped.wait(timeout)

    def close(self) -> None:
        """Reset the connections still open, stop listening and end the thread."""
        if self._loop is not None and not self._stopped.is_set():
            with contextlib.suppress(RuntimeError):  # the loop finished meanwhile
                self._loop.call_soon_threadsafe(self._closing.set)
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> LinkShaper:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.close()

    def stats(self) -> dict:
        """Everything counted so far, as JSON-ready data."""
        return {"listen": self.address, "target": format_address(*self.target),
                "profile": dataclasses.asdict(self.profile), "cuts": self.cuts,
                "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
                "connections": [dataclasses.asdict(c) for c in list(self.connections)]}

    def write_stats(self, path: Path | str) -> None:
        """Write `stats()` as JSON, atomically (a temporary file renamed into place)."""
        with atomic_file(path) as staging:
            staging.write_text(json.dumps(self.stats(), indent=1) + "\n")

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except OSError as err:  # only listening can fail this way; connections handle their own
            self._failure = err
        finally:
            self._ready.set()
            self._stopped.set()

    async def _serve(self) -> None:
        self._closing = asyncio.Event()
        loop = self._loop = asyncio.get_running_loop()
        listener = socket.create_server(
            self.listen, family=socket.AF_INET6 if ":" in self.listen[0] else socket.AF_INET)
        listener.setblocking(False)
        self.port = listener.getsockname()[1]
        self._started_at = loop.time()
        for at, length in self.cuts:
            loop.call_at(self._started_at + at, self._cut, +1)
            loop.call_at(self._started_at + at + length, self._cut, -1)
        accepting = asyncio.create_task(self._accept(listener))
        self._ready.set()
        await self._closing.wait()
        accepting.cancel()
        listener.close()
        self._drop_all("shutdown")
        await asyncio.gather(*self._carrying, return_exceptions=True)

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                connection, peer = await loop.sock_accept(listener)
            except OSError:  # the client gave up before we accepted, or no fds left: go on
                await asyncio.sleep(0.01)
                continue
            task = asyncio.create_task(self._carry(connection, format_address(*peer[:2])))
            self._carrying.add(task)
            task.add_done_callback(self._carrying.discard)

    def _now(self) -> float:
        return round(asyncio.get_running_loop().time() - self._started_at, 6)

    def _cut(self, change: int) -> None:
        self._cuts_active += change
        if change > 0:
            self._drop_all("cut")

    def _drop_all(self, end: str) -> None:
        for task, (stats, reset) in list(self._live.items()):
            if stats.end == "open":  # a connection cut a moment ago may not have finished yet
                stats.end = end
            reset()
            task.cancel()

    async def _carry(self, connection: socket.socket, peer: str) -> None:
        """Serve one client connection from accept to close."""
        loop = asyncio.get_running_loop()
        accepted = loop.time()
        stats = ConnectionStats(peer, opened_at=self._now())
        self.connections.append(stats)
        family = socket.AF_INET6 if ":" in self.target[0] else socket.AF_INET
        client, server = _Socket(connection), _Socket(socket.socket(family))

        def reset() -> None:  # what a socket had not sent yet never crossed the link
            stats.bytes_down -= client.close(reset=True)
            stats.bytes_up -= server.close(reset=True)

        self._live[asyncio.current_task()] = (stats, reset)  # from now on a cut drops it
        try:
            if self._cuts_active:
                stats.end = "refused"
                return
            try:
                await loop.sock_connect(server.sock, self.target)
            except OSError:
                stats.end = "unreachable"
                return

            def count_up(nbytes: int) -> None:
                stats.bytes_up += nbytes

            def count_down(nbytes: int) -> None:
                stats.bytes_down += nbytes

            # The three-way handshake that loopback skipped: the client could have sent from one
            # round trip after connecting (SYN, SYN-ACK), the server from one and a half (ACK).
            rtt = self.profile.rtt_ms / 1000
            up = _Pipe(client, server, self._up, count_up, self._clock, accepted, rtt)
            down = _Pipe(server, client, self._down, count_down, self._clock, accepted, 1.5 * rtt)
            async with asyncio.TaskGroup() as tasks:
                for coroutine in (up.read(), up.write(), down.read(), down.write()):
                    tasks.create_task(coroutine)
            stats.end = "closed"
        except* OSError:  # a side reset the connection or vanished: pass the reset on
            if stats.end == "open":
                stats.end = "reset"
        finally:  # also on cancellation, by a cut or shutdown (which set `end` already)
            self._live.pop(asyncio.current_task(), None)
            stats.closed_at = self._now()
            if stats.end == "closed":
                client.close(reset=False)
                server.close(reset=False)
            else:
                reset()
