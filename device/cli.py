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

CONNECT_TIMEOUT_S = 3.0  # how long `--cloud HOST:PORT` may take to answer before a warning


def register(subcommands: argparse._SubParsersAction) -> None:
    generate = subcommands.add_parser(
        "generate", help="generate with a member on ONNX Runtime, escalating to the next tier",
        description="Generate a continuation of --prompt with member --exit of FAMILY on ONNX "
                    "Runtime. Modes: local (member only), exit (escalate tokens the member is not "
                    "sure of), speculative (the next tier verifies runs of drafts; output = the "
                    "full model's greedy output), cloud (the next tier generates from token ids), "
                    "auto (per request, speculative or cloud, whichever was measured faster). "
                    "On a terminal, tokens settled by the next tier are bold blue and tokens "
                    "settled offline yellow; a summary line follows.")
    generate.add_argument("family", type=Path, help="family directory (with members/<K>/device.onnx)")
    prompt = generate.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text to continue")
    prompt.add_argument("--prompts-file", type=Path,
                        help="a JSON list of prompts, continued one after another by one client "
                             "(so adaptive drafts and auto mode learn the link); needs --json, "
                             "which then prints one JSON object per prompt and line")
    generate.add_argument("--exit", type=int, default=0, help="member to run on the device (default 0)")
    generate.add_argument("--mode", choices=MODES, default="local",
                          help="how the device uses the next tier (default local: not at all)")
    generate.add_argument("--cloud", default=None,
                          help="next tier: HOST:PORT of its gRPC service, or 'local' = the "
                               "reference model in this process (needs torch)")
    generate.add_argument("--cloud-token-file", type=Path, default=None,
                          help="bearer token for --cloud (first line of the file)")
    generate.add_argument("--require-cloud", action="store_true",
                          help="fail when the next tier cannot be reached, instead of going on "
                               "with the device's member alone")
    generate.add_argument("--policy", choices=POLICIES, default=DEFAULT_POLICY,
                          help=f"exit mode's confidence policy (default {DEFAULT_POLICY})")
    generate.add_argument("--threshold", type=float, default=None,
                          help="confidence threshold (default: calibration.json, else the "
                               "policy's: " + ", ".join(f"{p} {t}" for p, t in DEFAULT_THRESHOLDS.items())
                               + ")")
    generate.add_argument("--draft-tokens", type=_draft_tokens, default=4, metavar="N|adaptive",
                          help="drafts per speculative round (default 4), or 'adaptive': as many "
                               "as pay on this link, from the measured round trip, device step "
                               "and acceptance")
    generate.add_argument("--codec", choices=CODECS, default="fp32",
                          help="how hand-off rows travel (default fp32)")
    generate.add_argument("--max-new-tokens", type=int, default=64,
                          help="tokens to generate at most (default 64)")
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    generate.add_argument("--top-k", type=int, default=0,
                          help="sample among the k most likely tokens (default 0: no limit)")
    generate.add_argument("--top-p", type=float, default=1.0,
                          help="sample within the smallest set of this probability (default 1.0)")
    generate.add_argument("--seed", type=int, default=None,
                          help="seed of the sampler, for reproducible samples (default random)")
    generate.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    generate.add_argument("--ignore-eos", action="store_true",
                          help="keep generating past the end-of-text token (benchmarks, tests)")
    generate.add_argument("--int8", action="store_true", help="run the int8 member")
    generate.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    generate.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                          help="colour tokens by tier (default auto: on a terminal)")
    generate.add_argument("--json", action="store_true", help="print the result as JSON instead")
    generate.set_defaults(handler=run_generate)


def _next_tier(spec: str | None, family_dir: Path, token: str | None = None,
               require: bool = False):
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
    return _reachable_tier(spec, token, require)


def _reachable_tier(address: str, token: str | None, require: bool):
    """A `GrpcTier` for HOST:PORT, after checking that something answers there: a dead address
    is said on stderr (and is an error with `require`), not silently an offline generation."""
    import grpc

    from flow.errors import ConfigError
    from flow.tier_client import GrpcTier

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--cloud {address!r} is not HOST:PORT (or 'local')")
    tier = GrpcTier(address, token=token)
    try:
        grpc.channel_ready_future(tier.channel).result(timeout=CONNECT_TIMEOUT_S)
    except grpc.FutureTimeoutError:
        if require:
            raise ConfigError(f"nothing answers at --cloud {address} within "
                              f"{CONNECT_TIMEOUT_S:g} s (and --require-cloud was given)") from None
        print(f"flow generate: nothing answers at --cloud {address} within {CONNECT_TIMEOUT_S:g} s; "
              f"the device goes on alone and retries (--require-cloud makes this an error)",
              file=sys.stderr)
    return tier


def run_generate(args: argparse.Namespace) -> None:
    from device.client import DeviceClient
    from device.show import summary, write_steps

    token = (args.cloud_token_file.read_text().splitlines() or [""])[0].strip() \
        if args.cloud_token_file else None
    tier = _next_tier(args.cloud, args.family, token, args.require_cloud)
    client = DeviceClient(args.family, exit=args.exit, cloud=tier,
                          mode=args.mode, policy=args.policy, threshold=args.threshold,
                          draft_tokens=args.draft_tokens, codec=args.codec, int8=args.int8,
                          intra_op_threads=args.threads, require_cloud=args.require_cloud)
    options = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos)
    if args.prompts_file is not None:
        if not args.json:
            from flow.errors import ConfigError

            raise ConfigError("--prompts-file prints JSON lines: add --json")
        for text in _read_prompts(args.prompts_file):
            result = client.complete(text, args.max_new_tokens, **options)
            print(json.dumps({**result.__dict__, "device_share": result.device_share}), flush=True)
        return
    if args.json:
        result = client.complete(args.prompt, args.max_new_tokens, **options)
        print(json.dumps({**result.__dict__, "device_share": result.device_share}, indent=2))
        return
    colour = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    generation = client.generate(args.prompt, args.max_new_tokens, **options)  # checks the prompt
    write_steps(generation, args.prompt, colour)
    print(summary(generation), file=sys.stderr)


def _read_prompts(path: Path) -> list[str]:
    from flow.errors import ConfigError

    try:
        prompts = json.loads(path.read_text())
    except OSError as err:
        raise ConfigError(f"--prompts-file {path}: {err.strerror or err}") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"--prompts-file {path} is not JSON ({err})") from None
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p
                                                               for p in prompts):
        raise ConfigError(f"--prompts-file {path} must hold a JSON list of non-empty strings")
    return prompts


def _draft_tokens(value: str) -> int | str:
    from device.drafting import ADAPTIVE

    if value == ADAPTIVE:
        return value
    try:
        tokens = int(value)
    except ValueError:
        tokens = 0
    if tokens < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer or {ADAPTIVE!r}, got {value!r}")
    return tokens
