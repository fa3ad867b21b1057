"""Link profiles — the round trip, jitter, bandwidth and loss a `LinkShaper` imposes — and
`Direction`, the model that turns them into arrival times.

The named profiles are typical published figures for each kind of link, rounded — not
measurements of any particular network, and not taken on this machine:

- `lan`: switched gigabit Ethernet; sub-millisecond round trips (1 ms here, the shaper's timer
  resolution), no loss. The shaper itself, being Python, tops out at several hundred Mbit/s.
- `wifi`: a home 802.11ac network in front of a broadband line; round trips of 10-30 ms with a
  few ms of jitter and tens of Mbit/s, as in Ookla and Ofcom fixed-broadband reports.
- `4g`: LTE as reported by OpenSignal / Ookla mobile studies: 40-60 ms round trips, about
  25 Mbit/s down and 8 Mbit/s up, occasional loss.
- `3g`: the link web-performance tools emulate as "fast 3G" (Lighthouse's mobile throttling:
  150 ms RTT, 1.6 Mbit/s down, 750 kbit/s up), with HSPA-like jitter and 1 % loss.
- `bad`: a congested or edge-of-coverage link, worse than Chrome DevTools' "Slow 3G"
  (400 kbit/s): long, jittery round trips and a few percent loss — a stress case.
- `none`: no shaping at all (plain forwarding), for tests and as the base of custom settings.

How each number is applied (per direction; up = client to server, down = server to client):
- one-way delay = `rtt_ms / 2`, plus a random extra delay drawn uniformly from [0, `jitter_ms`]
  for every chunk; so round trips range over [rtt, rtt + 2·jitter]. Bytes stay in order.
- a chunk of n bytes occupies the direction's link for n·8 / bandwidth seconds, shared by every
  connection through the same shaper.
- loss is what TCP makes of it: bytes are never dropped (TCP would resend them); a lost segment
  arrives `stall_ms` late, and everything behind it on that connection waits for it.
- a new connection pays the three-way handshake that loopback skips: the client's first bytes
  leave one RTT after it connected, the server's one and a half.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

from flow.errors import FlowError

MSS = 1448  # bytes of payload in one TCP segment on a 1500-byte-MTU path with timestamps
MIN_RTO_MS = 200.0  # Linux's TCP_RTO_MIN: the shortest time TCP waits before resending
SLICE_S = 0.005  # a chunk is at most this much link time (or one segment), so slow links flow evenly
MAX_READ = 2**16  # and at most this many bytes


@dataclass(frozen=True)
class Profile:
    """A link's shape. Bandwidths in Mbit/s (10^6 bit/s), None meaning unlimited."""

    name: str
    rtt_ms: float = 0.0
    jitter_ms: float = 0.0
    up_mbps: float | None = None
    down_mbps: float | None = None
    loss: float = 0.0  # probability that a segment (MSS bytes) is lost, per direction

    def __post_init__(self) -> None:
        for field in ("rtt_ms", "jitter_ms"):
            if not getattr(self, field) >= 0:
                raise FlowError(f"link profile {self.name}: {field} must be >= 0 ms, "
                                f"got {getattr(self, field)}")
        for field in ("up_mbps", "down_mbps"):
            value = getattr(self, field)
            if value is not None and not value > 0:
                raise FlowError(f"link profile {self.name}: {field} must be > 0 Mbit/s (or "
                                f"unlimited), got {value}")
        if not 0 <= self.loss < 1:
            raise FlowError(f"link profile {self.name}: loss must be a probability in [0, 1), "
                            f"got {self.loss}")

    @property
    def stall_ms(self) -> float:
        """How late a lost segment arrives: TCP's retransmission timeout, RFC 6298's
        SRTT + 4·RTTVAR with the jitter standing in for RTTVAR, floored at Linux's 200 ms.

        Pessimistic for bulk transfers (fast retransmit repairs mid-stream losses in about one
        round trip) and right for what matters here, short request/response messages, whose
        lost last segment waits for the timeout."""
        return max(MIN_RTO_MS, self.rtt_ms + 4 * self.jitter_ms)

    def with_overrides(self, **changes: float | None) -> Profile:
        """This profile with some numbers replaced (None values are left alone); the name
        records that it was changed."""
        changes = {key: value for key, value in changes.items() if value is not None}
        if not changes:
            return self
        return dataclasses.replace(self, name=f"{self.name} (custom)", **changes)

    def describe(self) -> str:
        def rate(mbps: float | None) -> str:
            return "unlimited" if mbps is None else f"{mbps:g} Mbit/s"

        stall = f" (a lost segment stalls {self.stall_ms:g} ms)" if self.loss else ""
        return (f"RTT {self.rtt_ms:g} ms, jitter {self.jitter_ms:g} ms, up {rate(self.up_mbps)}, "
                f"down {rate(self.down_mbps)}, loss {self.loss * 100:g} %{stall}")


PROFILES: dict[str, Profile] = {profile.name: profile for profile in (
    Profile("none"),
    Profile("lan", rtt_ms=1, jitter_ms=0, up_mbps=1000, down_mbps=1000, loss=0),
    Profile("wifi", rtt_ms=20, jitter_ms=5, up_mbps=30, down_mbps=60, loss=0.001),
    Profile("4g", rtt_ms=50, jitter_ms=15, up_mbps=8, down_mbps=25, loss=0.002),
    Profile("3g", rtt_ms=150, jitter_ms=40, up_mbps=0.75, down_mbps=1.6, loss=0.01),
    Profile("bad", rtt_ms=400, jitter_ms=100, up_mbps=0.25, down_mbps=0.5, loss=0.03),
)}


def profile_named(name: str) -> Profile:
    """The named profile, or a FlowError listing the names there are."""
    try:
        return PROFILES[name]
    except KeyError:
        raise FlowError(f"unknown link profile {name!r}; choose one of: "
                        f"{', '.join(PROFILES)}") from None


class Direction:
    """One direction (up or down) of a link shaped by `profile`, shared by all connections: when
    each chunk sent over it arrives, by the rules above."""

    def __init__(self, mbps: float | None, profile: Profile, rng: random.Random):
        self.bits_per_s = mbps * 1e6 if mbps is not None else None
        self.one_way_s = profile.rtt_ms / 2000
        self.jitter_s = profile.jitter_ms / 1000
        self.loss = profile.loss
        self.stall_s = profile.stall_ms / 1000
        self.rng = rng
        self.free_at = 0.0  # when the link has finished sending everything booked so far
        self.read_size = (MAX_READ if self.bits_per_s is None
                          else max(MSS, min(MAX_READ, int(self.bits_per_s / 8 * SLICE_S))))

    def arrival(self, now: float, nbytes: int) -> float:
        """Book `nbytes` read at `now` on the link; the time they reach the other side."""
        start = max(now, self.free_at)
        self.free_at = start + (nbytes * 8 / self.bits_per_s if self.bits_per_s else 0.0)
        arrival = self.free_at + self.one_way_s + self.rng.uniform(0, self.jitter_s)
        # A chunk of k segments stalls when any of them is lost: the ones behind a lost segment
        # wait for it anyway, and chunks are at most SLICE_S of link time, so the ones before it
        # are late by at most that much.
        segments = -(-nbytes // MSS)
        if self.loss and self.rng.random() < 1 - (1 - self.loss) ** segments:
            arrival += self.stall_s
        return arrival
