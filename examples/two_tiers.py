"""Two tiers on one machine: `flow serve` in its own process, device clients in this one.

    python examples/two_tiers.py runs/demo/family --prompt "def fib(n):"

Starts the cloud tier (`flow serve --port 0 --workers 1`: a gRPC front end and one engine worker
process behind ZeroMQ), then generates the same continuation in every mode with member 0 on ONNX
Runtime and prints what each mode cost: tokens settled on the device, round trips, bytes sent,
tokens/s. `make demo` runs it.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from pathlib import Path

from device import DeviceClient


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("family", type=Path, help="family directory with exported members")
    parser.add_argument("--prompt", default="def fib(n):")
    parser.add_argument("--exit", type=int, default=0, help="member on the device (default 0)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    server = subprocess.Popen([sys.executable, "-m", "flow.cli.main", "serve", str(args.family),
                               "--port", "0", "--workers", "1", "--from-exit", str(args.exit)],
                              stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        if not line.startswith("listening on "):
            raise SystemExit(f"flow serve did not start (exit code {server.wait()})")
        address = line.split()[-1]
        print(f"cloud tier at {address}; device runs member {args.exit}\n")
        print(f"{'mode':12s} {'device':>7s} {'trips':>6s} {'KiB sent':>9s} {'tok/s':>7s}  text")
        for mode in ("local", "exit", "speculative", "cloud"):
            client = DeviceClient(args.family, exit=args.exit, cloud=address, mode=mode)
            result = client.complete(args.prompt, max_new_tokens=args.max_new_tokens)
            rate = len(result.tokens) / max(result.timings["total_s"], 1e-9)
            text = (args.prompt + result.text).replace("\n", "⏎")[:60]
            print(f"{mode:12s} {result.device_share:7.0%} {result.round_trips:6d} "
                  f"{result.bytes_sent / 1024:9.1f} {rate:7.1f}  {text}")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
