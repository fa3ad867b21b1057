"""`flow link`: shape a TCP path (latency, jitter, bandwidth, loss, outages) in user space."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path

from flow.errors import FlowError
from flow.link.profiles import PROFILES


def _address(text: str) -> tuple[str, int]:
    host, colon, port = text.rpartition(":")
    if not colon or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _seconds(text: str) -> list[float]:
    try:
        return [float(value) for value in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, or a comma-separated list of them, "
                                         f"got {text!r}") from None


def register(subcommands: argparse._SubParsersAction) -> None:
    link = subcommands.add_parser(
        "link", help="a TCP proxy that adds latency, jitter, bandwidth limits, loss and cuts",
        description="Forward TCP connections from --listen to --to through an emulated network "
                    "link (user space; no netem needed). Up is client to server, down is server "
                    "to client. Bytes are never dropped: a lost segment arrives late, as TCP's "
                    "retransmission would deliver it. Stops on Ctrl-C (or SIGTERM).",
        epilog="Profiles (typical published figures, not measurements): " + "; ".join(
            f"{name}: {profile.describe()}" for name, profile in PROFILES.items()))
    link.add_argument("--listen", type=_address, required=True, metavar="HOST:PORT",
                      help="address clients connect to (port 0: any free port, printed at start)")
    link.add_argument("--to", type=_address, required=True, metavar="HOST:PORT",
                      help="address of the server every connection is forwarded to")
    link.add_argument("--profile", default="none", metavar="NAME",
                      help=f"link profile to start from, one of {', '.join(PROFILES)} "
                           f"(default none: no shaping); the options below override its numbers")
    link.add_argument("--rtt-ms", type=float, default=None, metavar="MS",
                      help="round-trip time in milliseconds; each direction is delayed by half")
    link.add_argument("--jitter-ms", type=float, default=None, metavar="MS",
                      help="random extra one-way delay, uniform in [0, MS] milliseconds per "
                           "chunk; bytes stay in order")
    link.add_argument("--up-mbps", type=float, default=None, metavar="MBPS",
                      help="client-to-server bandwidth in Mbit/s (10^6 bit/s), shared by all "
                           "connections")
    link.add_argument("--down-mbps", type=float, default=None, metavar="MBPS",
                      help="server-to-client bandwidth in Mbit/s (10^6 bit/s), shared by all "
                           "connections")
    link.add_argument("--loss", type=float, default=None, metavar="P",
                      help="probability in [0, 1) that a TCP segment is lost; a lost segment (and "
                           "what follows it) arrives one retransmission timeout late, "
                           "max(200 ms, RTT + 4 x jitter)")
    link.add_argument("--cut-at", type=_seconds, action="append", metavar="SECONDS",
                      help="start of an outage, in seconds after the shaper starts listening; "
                           "repeat it or give a comma-separated list. During an outage open "
                           "connections are reset and new ones are reset on arrival")
    link.add_argument("--cut-for", type=_seconds, action="append", metavar="SECONDS",
                      help="length of each outage in seconds: one value for every --cut-at, or "
                           "one per --cut-at, in the same order")
    link.add_argument("--seed", type=int, default=None,
                      help="seed of the jitter and loss draws, for reproducible runs")
    link.add_argument("--stats", type=Path, default=None, metavar="FILE",
                      help="on exit, write the bytes carried up and down (total and per "
                           "connection) to FILE as JSON, atomically")
    link.set_defaults(handler=run_link)


def _cuts(starts: list[list[float]] | None,
          lengths: list[list[float]] | None) -> list[tuple[float, float]]:
    starts = [value for group in starts or () for value in group]
    lengths = [value for group in lengths or () for value in group]
    if bool(starts) != bool(lengths) or len(lengths) not in (1, len(starts)):
        raise FlowError(f"--cut-at and --cut-for must pair up: give one --cut-for for every cut or "
                        f"one per --cut-at (got {len(starts)} starts and {len(lengths)} lengths)")
    if len(lengths) == 1:
        lengths *= len(starts)
    return list(zip(starts, lengths, strict=True))


def run_link(args: argparse.Namespace) -> None:
    from flow.link import LinkShaper, profile_named
    from flow.link.proxy import format_address

    profile = profile_named(args.profile).with_overrides(
        rtt_ms=args.rtt_ms, jitter_ms=args.jitter_ms, up_mbps=args.up_mbps,
        down_mbps=args.down_mbps, loss=args.loss)
    cuts = _cuts(args.cut_at, args.cut_for)
    shaper = LinkShaper(target=args.to, profile=profile, listen=args.listen, cuts=cuts,
                        seed=args.seed)
    # `docker stop` sends SIGTERM: end the same clean way as Ctrl-C, writing --stats.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    shaper.start()
    try:
        outages = "".join(f"; cut at {at:g} s for {length:g} s" for at, length in cuts)
        print(f"flow link: listening on {shaper.address}, forwarding to "
              f"{format_address(*args.to)}; profile {profile.name}: {profile.describe()}{outages}",
              flush=True)
        # Wake now and then: a signal that lands just before a blocking wait begins would
        # otherwise not be handled (nor Ctrl-C answered) until the wait ended, that is never.
        while not shaper.wait(0.5):
            pass
        raise FlowError("the link shaper stopped unexpectedly (see the traceback above)")
    finally:
        shaper.close()
        if args.stats:
            shaper.write_stats(args.stats)
