"""`flow`: the command line of familial-flow.

Each subcommand lives in a module that registers its parser — flow's own here, the tiers' through
the `flow.commands` entry points — and this file only builds the parser, dispatches, and turns the
errors a user can act on into one clear line.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from importlib.metadata import entry_points

from flow.cli import (
    bench_commands,
    data_commands,
    family_commands,
    link_commands,
    simulate_commands,
)
from flow.errors import FlowError

COMMAND_MODULES = (data_commands, family_commands, link_commands, simulate_commands,
                   bench_commands)
# Modules of the optional extras, and the extra that brings each (pyproject.toml).
EXTRAS = {"torch": "cloud", "onnx": "cloud", "onnxscript": "cloud", "megatron": "train",
          "zmq": "cloud", "prometheus_client": "cloud", "grpc_health": "cloud",
          "grpc_reflection": "cloud", "gguf": "cloud", "transformers": "dev"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flow",
        description="Train one familial model once; deploy every exit from devices to the cloud.",
        epilog="Run `flow COMMAND --help` for the options of a command.")
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMAND_MODULES:
        module.register(subcommands)
    # Tiers add their commands (train, serve, generate, ...) through this entry-point group, so
    # flow/ never imports them.
    for plugin in sorted(entry_points(group="flow.commands"), key=lambda e: e.name):
        plugin.load().register(subcommands)
    return parser


def _answer_interrupts() -> None:
    """Ctrl-C (SIGINT) stops every command (exit status 130), even in a process started with
    SIGINT ignored, as a non-interactive shell starts background jobs: `flow simulate`, `docker
    stop` scripts and tests stop their `flow` children with SIGINT."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _answer_interrupts()
    try:
        return args.handler(args) or 0
    except FlowError as err:
        print(f"flow {args.command}: error: {err}", file=sys.stderr)
        return 1
    except ImportError as err:
        missing = (err.name or "").partition(".")[0]
        if missing not in EXTRAS:
            raise  # not an optional dependency: a bug, with its traceback
        print(f"flow {args.command}: error: this command needs {missing}, which this install "
              f"lacks (a device install has no torch); install the [{EXTRAS[missing]}] extra: "
              f"pip install 'familial-flow[{EXTRAS[missing]}]'", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"flow {args.command}: interrupted; nothing half-written was kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
