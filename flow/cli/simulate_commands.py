"""`flow simulate`: the cloud, an optional edge and N devices on shaped links, as processes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flow.link import PROFILES
from flow.tier import MODES

LOSSY_AND_LOSSLESS = [m for m in MODES if m != "local"]


def register(subcommands: argparse._SubParsersAction) -> None:
    simulate = subcommands.add_parser(
        "simulate", help="run the tiers and N devices on shaped links; report every mode",
        description="Start the cloud (`flow serve`, with --workers), an optional edge, and "
                    "--devices device processes (`flow generate`), each behind its own link "
                    "shaper of --profile, generating from held-out code prompts; for each --mode "
                    "print a table and write JSON: tokens/s per device, time to first token, "
                    "time between tokens (p50/p99), each tier's share, round trips and bytes "
                    "per token, cloud engine seconds per generated token, agreement with the "
                    "full model, errors. Ctrl-C stops every process it started.")
    simulate.add_argument("family", type=Path, help="family directory with exported members")
    simulate.add_argument("--devices", type=int, default=4, help="device processes (default 4)")
    simulate.add_argument("--profile", choices=list(PROFILES), default="4g",
                          help="every device's link (default 4g; see `flow link --help`)")
    simulate.add_argument("--mode", nargs="+", choices=LOSSY_AND_LOSSLESS,
                          default=["exit", "speculative", "cloud"],
                          help="modes, one after another (default: exit speculative cloud)")
    simulate.add_argument("--exit", type=int, default=0, help="the devices' member (default 0)")
    simulate.add_argument("--edge", action="store_true",
                          help="put an edge (blocks up to exit --exit + 1) between devices and cloud")
    simulate.add_argument("--workers", type=int, default=0,
                          help="the cloud's engine worker processes (default 0: in process)")
    simulate.add_argument("--corpus", type=Path, default=Path("runs/demo/corpus"),
                          help="corpus whose held-out split gives the prompts (default %(default)s)")
    simulate.add_argument("--prompts", type=int, default=3, help="prompts per device (default 3)")
    simulate.add_argument("--tokens", type=int, default=32, help="tokens per prompt (default 32)")
    simulate.add_argument("--draft-tokens", default="adaptive",
                          help="speculative drafts per round, or 'adaptive' (default)")
    simulate.add_argument("--out", type=Path, default=None,
                          help="write the report here as JSON (default: print the table only)")
    simulate.set_defaults(handler=run_simulate)


def run_simulate(args: argparse.Namespace) -> None:
    from flow.data.corpus import code_prompts
    from flow.fsutil import atomic_file
    from flow.simulate import Plan, Simulation, format_table

    plan = Plan(args.family, code_prompts(args.corpus, args.prompts), args.mode,
                devices=args.devices, profile=args.profile, exit=args.exit, tokens=args.tokens,
                workers=args.workers, edge=args.edge, draft_tokens=args.draft_tokens)
    with Simulation(plan) as simulation:
        report = simulation.run(progress=lambda line: print(line, flush=True))
    print(format_table(report))
    if args.out is not None:
        with atomic_file(args.out) as staging:
            staging.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")
