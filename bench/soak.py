"""Soak: the reliability suite (tests/reliability) for a bounded time against real `flow serve`
processes on loopback, two side by side: the engine in the server process, and in two worker
processes (`--workers 2`). Each server (4 KV slots, 32 rows per request, a 10 s session TTL, a
`--token-file` of two identities) goes through every case, then SIGTERM; new pairs follow while
time lasts. Cases:

- malformed: raw bytes and invalid messages at every `flow.v1.Tier` method (a generic
  `channel.unary_unary`, no serializer); the session they aimed at must still answer right;
- oversized: more rows than `max_rows`, a 65 MiB message, absurd shapes, top-k and lengths;
- bad_token: no token, wrong tokens, malformed headers; another identity's calls on a session;
- flood: waves of devices (exit, speculative, cloud) 2.5 x the KV slots, sessions abandoned by
  the dozen, and the three cases above, all at once;
- churn: sessions opened, answered, then closed, abandoned, rolled back, or a stream dropped;
- kill (workers): kill -9 a worker mid-generation; the devices replay on the other one;
- freeze: SIGSTOP the server for --freeze seconds while devices generate in cloud, exit and
  speculative modes; they go on with their member, then with the tier again.

Counted per case: tried; refused cleanly (RESOURCE_EXHAUSTED, INVALID_ARGUMENT, UNAUTHENTICATED,
UNAVAILABLE, DEADLINE_EXCEEDED, NOT_FOUND, FAILED_PRECONDITION, or a device going on alone);
verified (the tier's tokens are the full model's greedy choices given their prefix, the
device's its member's: on the family's torch model, near ties as in tests/greedy.py);
unexpected (any other status, a wrong or missing token, a call past its deadline, no right
answer within 10 s of a fault, a server that died, outlived SIGTERM or printed a traceback).
Memory: VmRSS summed over each server's process tree, sampled every 0.2 s.

    python bench/soak.py                         # 120 s, a tiny family built in a temp dir
    python bench/soak.py --duration 600 --family runs/demo/family --exit 1   # after `make demo`

--duration bounds the whole run, family build included, to within about 10 s, and one pass of
both servers (about 40 s on 2 cores) always runs. Writes bench/results/soak.json; exits 1 if
anything was unexpected, 130 if interrupted; every process it started is killed either way.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import common
from common import write_json
from soak_cases import bad_token, churn, flood, freeze, malformed, oversized, under_fault
from soak_world import COUNTS, MAX_ROWS, SLOTS, TTL_S, Context, Ledger, Reference, Server, tree

from flow.artifact import read_manifest

CONFIGS = {"in-process": 0, "workers-2": 2}  # name: --workers
LIFETIME_S, MIN_LIFETIME_S = 30.0, 10.0


@dataclass
class Run:
    """What every server of a run shares."""

    args: argparse.Namespace
    family_dir: Path
    exported: Future  # done once the devices' member is exported
    reference: Reference
    work: Path  # a temporary directory: the token file, the servers' output
    tokens: tuple[str, str]  # two identities, in `token_file`
    token_file: Path
    live: list  # every Server started, for the cleanup


def lifetime(run: Run, ledger: Ledger, workers: int, out: Path, until: float) -> dict:
    """One server through every case until `until`, then stopped; its figures."""
    args, family_dir = run.args, run.family_dir
    began, server = time.monotonic(), Server(family_dir, out, args.exit, workers, run.token_file)
    run.live.append(server)
    ledger.add("server", 1)
    ctx = None
    try:
        ctx = Context(family_dir, args.exit, read_manifest(family_dir, weights=False).family_hash,
                      run.reference, ledger, server.wait_listening(), run.tokens)
        run.exported.result(timeout=300)  # the devices' member
        malformed(ctx)  # first on a quiet server, where the session they aim at is not evicted
        oversized(ctx, huge_message=True)
        bad_token(ctx)
        share = max(0.0, until - time.monotonic() - args.freeze - 7.0 - 3.0 * bool(workers)) / 2
        flood(ctx, time.monotonic() + share)
        churn(ctx, time.monotonic() + share)
        if workers:  # kill -9 a worker mid-generation
            under_fault(ctx, "kill", ("exit", "speculative") * 2,
                        lambda: os.kill(tree(server.pid)[1], signal.SIGKILL), 0.03, 40, 3.0, 0.0)
        under_fault(ctx, "freeze", ("cloud", "exit", "speculative"),
                    lambda: freeze(server.pid, args.freeze), 0.04, 48, 1.0, args.freeze + 2.0)
    except Exception as err:  # noqa: BLE001 - it did not start, or a case failed: counted
        ledger.add("server", unexpected=f"{type(err).__name__}: {err}")
    finally:
        server.stop(ledger)
        if ctx is not None:
            ctx.close()
    return {"config": ledger.config, "seconds": round(time.monotonic() - began, 1),
            "peak_rss_bytes": server.peak_rss}


def build_family(path: Path, exported: Future) -> None:
    """The tests' tiny family (5 layers, exits after 1, 2, 4, context 96; heads sharpened, early
    members agreeing with the full model often but not always), saved; member 0 is exported on
    a thread (`exported` is done then) while the servers, which need only the weights, start."""
    from builders import agreeing_copy, sharpen_heads, tiny_config  # tests/, on sys.path by soak_world
    from flow import Family
    from flow.onnx_export import export_family_members

    agreeing_copy(sharpen_heads(Family.random(tiny_config(head_dim=16, max_seq_len=96), seed=11))).save(path)

    def export() -> None:
        try:
            with common.quiet():
                exported.set_result(export_family_members(path, exits=[0]))
        except Exception as err:  # noqa: BLE001 - the lifetimes waiting for it raise it
            exported.set_exception(err)

    threading.Thread(target=export, daemon=True).start()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=120.0,
                        help="seconds the whole run takes, give or take 10 (default 120)")
    parser.add_argument("--family", type=Path, default=None,
                        help="family directory with weights and members/<exit>/device.onnx, e.g. "
                             "runs/demo/family (default: the tests' tiny family, built in a "
                             "temporary directory, so that a fresh checkout runs it)")
    parser.add_argument("--exit", type=int, default=0, help="the devices' member (default 0)")
    parser.add_argument("--freeze", type=float, default=5.0, help="seconds a SIGSTOP lasts (default 5)")
    parser.add_argument("--results", type=Path, default=common.RESULTS,
                        help="directory soak.json is written to (default bench/results)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # cleaned up as after Ctrl-C
    began = time.monotonic()
    deadline, ledger, lifetimes, live, interrupted = began + args.duration, Ledger(), [], [], False
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        try:
            family_dir, exported = (args.family or Path(tmp) / "family").resolve(), Future()
            if args.family:
                exported.set_result(None)
            else:
                build_family(family_dir, exported)
            tokens = (secrets.token_hex(16), secrets.token_hex(16))
            (token_file := Path(tmp) / "tokens.txt").write_text("\n".join(tokens) + "\n")
            run = Run(args, family_dir, exported, Reference(family_dir, args.exit), Path(tmp), tokens,
                      token_file, live)
            overshoot = 0.0  # how far a pass ran past its `until` (its fixed cases and stops)
            for passes in range(10**6):  # a pair of servers per pass
                if passes and time.monotonic() + MIN_LIFETIME_S + overshoot > deadline:
                    break
                until = min(time.monotonic() + LIFETIME_S, deadline - overshoot)
                pair = [threading.Thread(target=lambda *a: lifetimes.append(lifetime(*a)), daemon=True,
                                         args=(run, ledger.view(name), workers, run.work / f"{name}-{passes}", until))
                        for name, workers in CONFIGS.items()]
                for thread in pair:
                    thread.start()
                for thread in pair:
                    thread.join()
                overshoot = max(overshoot, time.monotonic() - until)
        except KeyboardInterrupt:
            interrupted = True
            ledger.closed.set()
        finally:
            for server in live:
                server.kill()
    report(args, ledger, lifetimes, live, time.monotonic() - began, interrupted)
    return 130 if interrupted else int(any(c["unexpected"] for c in ledger.cases.values()))


def report(args, ledger: Ledger, lifetimes: list[dict], servers: list[Server], seconds: float,
           interrupted: bool) -> None:
    cases = ledger.cases
    totals = {count: sum(case[count] for case in cases.values()) for count in COUNTS}
    peak = max((server.peak_rss for server in servers), default=0)
    common.RESULTS = args.results
    path = write_json("soak", {
        "config": {"duration_s": args.duration, "family": str(args.family or "tiny, built"),
                   "exit": args.exit, "freeze_s": args.freeze, "max_sessions": SLOTS,
                   "max_rows": MAX_ROWS, "session_ttl_s": TTL_S, "servers": CONFIGS},
        "seconds": round(seconds, 1), "interrupted": interrupted, "cases": cases, **totals,
        "peak_rss_bytes": peak, "lifetimes": lifetimes,
        "unexpected_details": [{"case": kind, "config": config, "what": what, "count": count}
                               for (kind, config, what), count in ledger.details.most_common()]})
    print(f"{'case':<10} {'tried':>6} {'refused':>8} {'verified':>9} {'offline':>8} {'unexpected':>11}")
    for kind, c in [*cases.items(), ("total", totals)]:
        print(f"{kind:<10} {c['tried']:>6} {c['refused_cleanly']:>8} {c['verified']:>9} "
              f"{c['offline_tokens']:>8} {c['unexpected']:>11}")
    print(f"{len(servers)} servers in {seconds:.0f} s; peak RSS of a server's process tree "
          f"{peak / 2**20:.0f} MiB; wrote {path}")
    for (kind, config, what), count in ledger.details.most_common():
        print(f"  unexpected [{kind}, {config}] x{count}: {what}")


if __name__ == "__main__":
    sys.exit(main())
