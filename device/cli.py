"""`flow generate`: run the device SDK from the command line, each token's tier visible.

Registered through the `flow.commands` entry point, so `flow` itself never imports the device
tier. `--cloud local` continues in this process with the reference model (it needs torch, i.e.
the `[cloud]` extra); a device without torch runs `--mode local`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flow.codecs import CODECS
from flow.confidence import DEFAULT_POLICY, DEFAULT_THRESHOLDS, POLICIES
from flow.tier import MODES


def register(subcommands: argparse._SubParsersAction) -> None:
    generate = subcommands.add_parser(
        "generate", help="generate with a member on ONNX Runtime, escalating to the next tier",
        description="Generate a continuation of --prompt with member --exit of FAMILY on ONNX "
                    "Runtime. Modes: local (member only), exit (escalate tokens the member is not "
                    "sure of), speculative (the next tier verifies runs of drafts; output = the "
                    "full model's greedy output), cloud (the next tier generates from token ids). "
                    "On a terminal, tokens settled by the next tier are bold blue and tokens "
                    "settled offline yellow; a summary line follows.")
    generate.add_argument("family", type=Path, help="family directory (with members/<K>/device.onnx)")
    generate.add_argument("--prompt", required=True, help="text to continue")
    generate.add_argument("--exit", type=int, default=0, help="member to run on the device (default 0)")
    generate.add_argument("--mode", choices=MODES, default="local")
    generate.add_argument("--cloud", default=None,
                          help="next tier: HOST:PORT of its gRPC service, or 'local' = the "
                               "reference model in this process (needs torch)")
    generate.add_argument("--policy", choices=POLICIES, default=DEFAULT_POLICY)
    generate.add_argument("--threshold", type=float, default=None,
                          help="confidence threshold (default: calibration.json, else the "
                               "policy's: " + ", ".join(f"{p} {t}" for p, t in DEFAULT_THRESHOLDS.items())
                               + ")")
    generate.add_argument("--draft-tokens", type=int, default=4, help="drafts per speculative round")
    generate.add_argument("--codec", choices=CODECS, default="fp32",
                          help="how hand-off rows travel (default fp32)")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    generate.add_argument("--ignore-eos", action="store_true",
                          help="keep generating past the end-of-text token (benchmarks, tests)")
    generate.add_argument("--int8", action="store_true", help="run the int8 member")
    generate.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    generate.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    generate.add_argument("--json", action="store_true", help="print the result as JSON instead")
    generate.set_defaults(handler=run_generate)


def _next_tier(spec: str | None, family_dir: Path):
    if spec in (None, ""):
        return None
    if spec == "local":
        try:
            from flow.family import Family
        except ImportError as err:
            from flow.errors import ConfigError

            raise ConfigError(f"--cloud local runs the reference model, which needs torch ({err}); "
                              f"install the [cloud] extra or use --mode local") from None
        from flow.reference_tier import ReferenceTier

        return ReferenceTier(Family.load(family_dir))
    return spec  # an address: DeviceClient says what it supports


def run_generate(args: argparse.Namespace) -> None:
    from device.client import DeviceClient
    from device.show import summary, write_steps

    client = DeviceClient(args.family, exit=args.exit, cloud=_next_tier(args.cloud, args.family),
                          mode=args.mode, policy=args.policy, threshold=args.threshold,
                          draft_tokens=args.draft_tokens, codec=args.codec, int8=args.int8,
                          intra_op_threads=args.threads)
    options = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos)
    if args.json:
        result = client.complete(args.prompt, args.max_new_tokens, **options)
        print(json.dumps({**result.__dict__, "device_share": result.device_share}, indent=2))
        return
    colour = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    generation = client.generate(args.prompt, args.max_new_tokens, **options)  # checks the prompt
    write_steps(generation, args.prompt, colour)
    print(summary(generation), file=sys.stderr)
