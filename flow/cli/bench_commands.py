"""`flow bench`: the benchmark suite of a source checkout (bench/suite.py)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

SUITE = Path(__file__).resolve().parents[2] / "bench" / "suite.py"


def register(subcommands: argparse._SubParsersAction) -> None:
    bench = subcommands.add_parser(
        "bench", help="run the benchmarks behind the README's figures (from a source checkout)",
        description="Run benchmarks of bench/suite.py one after another, each writing JSON (and "
                    "a PNG) under bench/results/; `all` runs every one whose inputs exist (what "
                    "`make demo` builds), except the long ones without --long, writes "
                    "bench/results/suite.json, and puts the results report into README.md. About "
                    "an hour on a 2-core machine; each benchmark's own --help has quicker settings.")
    bench.add_argument("names", nargs="*", default=["list"], metavar="NAME",
                       help="`list` (default), `all`, or benchmark names from the list")
    bench.add_argument("--long", action="store_true",
                       help="`all` also runs the benchmarks that train for an hour or more")
    bench.set_defaults(handler=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from flow.errors import FlowError

    if not SUITE.is_file():
        raise FlowError(f"no {SUITE}: `flow bench` runs from a source checkout of familial-flow "
                        f"(git clone, then `make test` sets it up)")
    long = ["--long"] if args.long else []
    return subprocess.run([sys.executable, str(SUITE), *args.names, *long]).returncode
