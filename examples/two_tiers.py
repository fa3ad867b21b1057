"""Two tiers on one machine: `flow serve` in its own process, device clients in this one, a
shaped link between them.

    python examples/two_tiers.py runs/demo/family --prompt "def fib(n):" [--profile 4g]

Starts the cloud tier (`flow serve --port 0 --workers 1`: a gRPC front end and one engine worker
process behind ZeroMQ) and a link shaper in front of it (`flow.link`, default profile `wifi`:
20 ms round trips, 30/60 Mbit/s), then generates the same prompt in every mode with the member on
ONNX Runtime, prints each continuation with the tokens the cloud settled in bold blue, and what
each mode cost: tokens settled on the device, round trips, bytes sent, tokens/s, drafts accepted.
`make demo` runs it.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from pathlib import Path

from device import DeviceClient
from device.show import COLOURS, RESET, summary, write_steps
from flow.link import PROFILES, LinkShaper
from flow.tier import MODES


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("family", type=Path, help="family directory with exported members")
    parser.add_argument("--prompt", default="def fib(n):")
    parser.add_argument("--exit", type=int, default=0, help="member on the device (default 0)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--profile", choices=list(PROFILES), default="wifi",
                        help="the link between device and cloud (default wifi)")
    parser.add_argument("--no-color", dest="color", action="store_false",
                        help="mark nothing (the summaries still give each mode's device share)")
    args = parser.parse_args()
    # One device talks to it: a few KV slots are enough (the pool is allocated up front).
    server = subprocess.Popen([sys.executable, "-m", "flow.cli.main", "serve", str(args.family),
                               "--port", "0", "--workers", "1", "--from-exit", str(args.exit),
                               "--max-sessions", "4"],
                              stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        if not line.startswith("listening on "):
            raise SystemExit(f"flow serve did not start (exit code {server.wait()})")
        host, port = line.split()[-1].rsplit(":", 1)
        legend = (f" Tokens the device settled are plain, the cloud's {COLOURS['tier']}bold "
                  f"blue{RESET}." if args.color else "")
        with LinkShaper((host, int(port)), PROFILES[args.profile]) as link:
            print(f"cloud tier at {host}:{port}, reached over a {args.profile} link "
                  f"({PROFILES[args.profile].describe()}); device runs member {args.exit}."
                  f"{legend}\n")
            for mode in MODES:
                client = DeviceClient(args.family, exit=args.exit, cloud=link.address, mode=mode,
                                      draft_tokens="adaptive")
                generation = client.generate(args.prompt, max_new_tokens=args.max_new_tokens)
                title = mode if generation.mode == mode else f"{mode} (ran {generation.mode})"
                print(f"── {title} " + "─" * (60 - len(title)))
                write_steps(generation, args.prompt, colour=args.color)
                print(f"   {summary(generation)}\n")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
