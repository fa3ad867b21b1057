"""Cloud tier throughput: the batched engine against one request at a time, through the engine
itself and through the real gRPC service, and cloud-mode whole-model generation against
`transformers`' generate on the same weights.

A random family of --preset (LM heads sharpened as in the tests, so that greedy tokens are clear
and the token checks below mean something; timing is unaffected) is built once, or --family
loads a trained one (e.g. the SmolLM2 family). Every session
continues after exit 0 with hand-off rows the family itself computes for random token ids. The
work of one session: catch up a --prompt-row prompt in one request, then decode single rows, one
request per row, the next sent only after the answer (the exit-mode pattern of a device).

1. Engine (no network), for each concurrency C in --concurrency, rounds in which the two modes
   take turns (order rotated each round, so a shared machine's drift hits both alike):
   - batched: all C sessions submit, then `step()` serves them together (continuous batching);
   - one at a time: the same requests, each submitted and stepped alone (the unbatched baseline).
   Each round rolls every session back (free) and repeats the catch-up and --steps decode steps at
   the same positions in both modes. Decode tokens/s = rows answered per second of decode steps;
   catch-up rows/s likewise. Per-request latency counts from the moment all C requests of a step
   are due to each one's answer (one at a time, the last waits for the C - 1 before it).
2. gRPC, through `cloud.service.ServerThread` in a child process, for C in --grpc-concurrency:
   C clients, each a process of its own as devices are (--clients-in threads: threads of this
   process, sharing its GIL), each with its own `GrpcTier` channel and session, catch up and then
   run --grpc-steps decode calls per round; tokens/s from each round's wall time, p50/p99
   per-call latency as the clients see it, and gRPC / engine: the share of the batched engine's
   own tokens/s (part 1, same C) that reaches the clients. Servers: the engine in the server process (`workers=0`), engine worker
   processes (`--grpc-workers`, each with threads / workers torch threads), and the in-process
   engine limited to one row per step (`max_batch_rows=1`: one request at a time, the baseline;
   up to --grpc-baseline-max clients, since it is slow by design). Clients send their requests
   on a `ContinueStream` per session, as `GrpcTier` does; with --grpc-calls (the default) the
   in-process engine and the front end alone are measured again with one `Continue` call per
   request, which is what each request's call setup costs the server.
3. Generation: the whole model from token ids, greedy, --gen-prompt prompt tokens and
   --gen-tokens new tokens: `Engine.submit_generate` stepped to completion, the same through
   `GrpcTier.generate`, and `transformers` `Qwen3ForCausalLM.generate` on the family's last member
   exported with `Family.export_hf`; batch 1 and batch --gen-batch (concurrent generations on the
   engine, one batched generate call for transformers). Tokens/s = new tokens / wall time of the
   call, prompt included; same torch thread count everywhere.

Where an engine step's time goes: the batched decode phase's seconds per stage (schedule, inputs,
blocks, head, answers; `Engine.stats()["stage_seconds"]`) at each C.

Requests of mixed lengths arriving over time, against a static batch: bench/serving.py.

    python bench/cloud_throughput.py              # default sizes, about 4-6 minutes on 2 cores
    python bench/cloud_throughput.py --quick      # tiny family, under a minute: checks the script
    python bench/cloud_throughput.py --concurrency 1 8 32 --grpc-workers 0

Writes bench/results/cloud_throughput.{json,png}.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import REPO, RESULTS, parse_with_quick, save_figure, transformers_model, write_json
from throughput_engine import engine_level, engine_reference_tokens
from throughput_generation import generation
from throughput_grpc import A_CALL_EACH, FRONT_END_ALONE, grpc_level, serve_child, server_process

NAME = "cloud_throughput"
TARGET_RATIO, TARGET_AT = 4.0, 32  # the target: batched >= 4x one at a time at 32 sessions
# --quick replaces these defaults (explicit flags still win).
QUICK = dict(preset="tiny", concurrency=[1, 4, 32], grpc_concurrency=[1, 4], prompt=8, steps=4,
             grpc_steps=4, rounds=2, gen_prompt=8, gen_tokens=8, gen_batch=4, gen_rounds=2)


# ---- arguments ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo", help="family architecture preset (default: %(default)s)")
    parser.add_argument("--family", type=Path, help="measure this family directory instead of a random --preset")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, everywhere (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64],
                        help="sessions at the engine level (default: %(default)s)")
    parser.add_argument("--grpc-concurrency", type=int, nargs="+", default=[1, 4, 16, 32, 64],
                        help="concurrent gRPC clients (default: %(default)s)")
    parser.add_argument("--grpc-workers", type=int, nargs="+", default=[0, 2],
                        help="server variants: 0 = engine in the server process, N = N worker "
                             "processes (default: %(default)s)")
    parser.add_argument("--clients-in", choices=["processes", "threads"], default="processes",
                        help="gRPC clients each in a process of their own (as devices are), or as "
                             "threads of this process sharing its GIL (default: %(default)s)")
    parser.add_argument("--cores", choices=["shared", "split"], default="shared",
                        help="shared: everything on every core; split: the engine, the server and "
                             "the generation runners on the first half of the cores (threads = its "
                             "size), the gRPC clients on the other half, as devices on other "
                             "machines would be (default: %(default)s)")
    parser.add_argument("--grpc-baseline-max", type=int, default=32,
                        help="the gRPC one-at-a-time server (max_batch_rows=1) runs the client counts "
                             "up to this (0 = skip it); it is the slowest part (default: %(default)s)")
    parser.add_argument("--grpc-calls", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure the in-process engine and the front end alone with one "
                             "Continue call per request instead of a ContinueStream per session "
                             "(default: %(default)s)")
    parser.add_argument("--prompt", type=int, default=32, help="catch-up rows per session (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=32, help="engine decode steps per round (default: %(default)s)")
    parser.add_argument("--grpc-steps", type=int, default=32,
                        help="decode calls per client per gRPC round (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (after one warm-up) (default: %(default)s)")
    parser.add_argument("--gen-prompt", type=int, default=32, help="generation prompt tokens (default: %(default)s)")
    parser.add_argument("--gen-tokens", type=int, default=64, help="generated tokens (default: %(default)s)")
    parser.add_argument("--gen-batch", type=int, default=8, help="concurrent generations (default: %(default)s)")
    parser.add_argument("--gen-rounds", type=int, default=5,
                        help="timed generation rounds (after one warm-up) (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny family and few steps (< 60 s)")
    parser.add_argument("--name", default=NAME, help="results file name under bench/results (default: %(default)s)")
    parser.add_argument("--serve-spec", help=argparse.SUPPRESS)  # internal: run as the server child
    args = parse_with_quick(parser, QUICK, argv)
    for name in ("threads", "prompt", "steps", "grpc_steps", "rounds", "gen_prompt", "gen_tokens", "gen_batch",
                 "gen_rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    cpus = sorted(os.sched_getaffinity(0))
    args.server_cpus = args.client_cpus = None
    if args.cores == "split":
        if len(cpus) < 2 or args.clients_in != "processes":
            parser.error("--cores split needs 2 cores or more and the clients in processes")
        args.server_cpus, args.client_cpus = cpus[:len(cpus) // 2], cpus[len(cpus) // 2:]
        args.threads = len(args.server_cpus)
    if min(args.concurrency + args.grpc_concurrency) < 1 or min(args.grpc_workers) < 0:
        parser.error("concurrencies must be >= 1 and worker counts >= 0")
    return args


def versions() -> dict:
    import grpc
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "grpcio": grpc.__version__, "numpy": np.__version__}




# ---- output ---------------------------------------------------------------------------------


def print_tables(engine_rows: list[dict], grpc: dict, gen: dict) -> None:
    print("\nengine (no network): decode tokens/s, catch-up rows/s, per-request latency")
    print(f"  {'C':>3} {'batched tok/s':>14} {'1-at-a-time':>12} {'ratio':>6} {'catch-up b rows/s':>18} "
          f"{'1-at-a-time':>12} {'batched p50/p99 ms':>19} {'1-at-a-time p50/p99':>20} {'same tok':>9}")
    for row in engine_rows:
        b, o = row["batched"], row["one_at_a_time"]
        print(f"  {row['sessions']:>3} {b['decode_tokens_per_s']:>14.0f} {o['decode_tokens_per_s']:>12.0f} "
              f"{row['decode_ratio']:>6.1f} {b['catch_up_rows_per_s']:>18.0f} {o['catch_up_rows_per_s']:>12.0f} "
              f"{b['latency']['p50_ms']:>9.1f} / {b['latency']['p99_ms']:<7.1f} "
              f"{o['latency']['p50_ms']:>10.1f} / {o['latency']['p99_ms']:<7.1f} "
              f"{row['token_agreement_batched_vs_one']:>9.3f}")
    print("\nengine, batched decode: share of step time by stage")
    for row in engine_rows:
        stages = row["batched"]["decode_stage_seconds"]
        total = sum(stages.values()) or 1.0
        print(f"  {row['sessions']:>3} " + "  ".join(f"{k} {v / total:5.1%}" for k, v in stages.items()))
    print("\ngRPC service: decode tokens/s and per-call latency p50 / p99 (ms), as the clients see it")
    labels = list(grpc)
    print(f"  {'C':>3} " + " ".join(f"{label:>28}" for label in labels))
    print(f"  {'':>3} " + " ".join(f"{'tok/s   p50 / p99 ms':>28}" for _ in labels))
    by_clients = {label: {r["clients"]: r for r in data["rows"]} for label, data in grpc.items()}
    for count in sorted({c for rows in by_clients.values() for c in rows}):
        cells = []
        for label in labels:
            r = by_clients[label].get(count)
            cells.append("-" if r is None else f"{r['tokens_per_s']:>8.0f} {r['latency']['p50_ms']:>8.1f} / "
                                               f"{r['latency']['p99_ms']:<8.1f}")
        print(f"  {count:>3} " + " ".join(f"{c:>28}" for c in cells))
    for label, data in grpc.items():
        shares = [f"{r['over_engine_batched']:.0%} at {r['clients']}" for r in data["rows"]
                  if "over_engine_batched" in r]
        if shares:
            what = ("calls/s without a model, as a share of the engine's batched tokens/s (the ceiling)"
                    if data["no_engine"] else "of the engine's batched tokens/s, gRPC delivers")
            print(f"  {label}: {what} " + ", ".join(shares))
    print(f"\ngeneration, whole model, greedy: {gen['prompt_tokens']} prompt + {gen['new_tokens']} new tokens")
    agree = gen["token_agreement_vs_transformers"]
    for label, run in gen["runs"].items():
        same = agree.get(label)
        print(f"  {label:<24} {run['tokens_per_s']:>8.0f} tok/s  ({run['median_s'] * 1e3:.0f} ms)"
              + ("" if same is None else f"  same tokens as transformers: {same:.3f}"))
    batched = gen[f"engine_over_transformers_batch{gen['batch']}"]
    print(f"  engine / transformers: batch 1 {gen['engine_over_transformers_batch1']:.2f}x, "
          f"batch {gen['batch']} {batched:.2f}x")


def plot(engine_rows: list[dict], grpc: dict, gen: dict, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (speed, latency, bars) = plt.subplots(1, 3, figsize=(17, 4.8), width_ratios=(1.2, 1.2, 1))
    counts = [r["sessions"] for r in engine_rows]
    speed.plot(counts, [r["batched"]["decode_tokens_per_s"] for r in engine_rows], "-o", label="engine, batched")
    speed.plot(counts, [r["one_at_a_time"]["decode_tokens_per_s"] for r in engine_rows], "--s",
               label="engine, one at a time")
    styles = ["-^", "-v", ":x", "-d"]
    for index, (label, data) in enumerate(grpc.items()):
        rows, style, color = data["rows"], styles[index % len(styles)], f"C{index + 2}"
        clients = [r["clients"] for r in rows]
        speed.plot(clients, [r["tokens_per_s"] for r in rows], style, color=color, label=f"gRPC, {label}")
        latency.plot(clients, [r["latency"]["p50_ms"] for r in rows], style, color=color, label=f"{label} p50")
        latency.plot(clients, [r["latency"]["p99_ms"] for r in rows], style, color=color, alpha=0.4,
                     label=f"{label} p99")
    for axis in (speed, latency):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        ticks = sorted(set(counts) | set(args.grpc_concurrency))
        axis.set_xticks(ticks, [str(t) for t in ticks])
        axis.minorticks_off()
        axis.set_xlabel("concurrent sessions")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    speed.set_ylabel("decode tokens / s (log)")
    speed.set_title(f"{args.label} family after exit 0: decode throughput, {args.threads} threads", fontsize=10)
    latency.set_ylabel("per-call latency, ms (log)")
    latency.set_title("gRPC per-call latency: p50 (solid), p99 (faint)", fontsize=10)
    labels = list(gen["runs"])
    drawn = bars.bar(range(len(labels)), [gen["runs"][k]["tokens_per_s"] for k in labels],
                     color=["C0" if "engine" in k else "C1" for k in labels])
    bars.bar_label(drawn, fmt="%.0f", fontsize=7)
    bars.set_xticks(range(len(labels)), [k.replace("_batch", "\nbatch ").replace("_", " ") for k in labels], fontsize=7)
    bars.set_ylabel("new tokens / s")
    bars.set_title(f"whole-model greedy generation ({gen['prompt_tokens']} + {gen['new_tokens']} tokens)",
                   fontsize=10)
    figure.tight_layout()
    return figure


# ---- main -----------------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    if args.serve_spec:
        serve_child(args.serve_spec)
        return
    import torch

    from flow.config import preset
    from flow.family import Family

    sys.path.insert(0, str(REPO / "tests"))
    from builders import sharpen_heads

    if args.server_cpus:  # the engine level and the generation runners, where the server runs
        os.sched_setaffinity(0, args.server_cpus)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load_before = os.getloadavg()  # other work on the machine skews every number; record it
    if args.family is not None:
        family, args.label = Family.load(args.family), str(args.family)
    else:
        family, args.label = sharpen_heads(Family.random(preset(args.preset), seed=args.seed)), args.preset
    config = family.config
    most = max(args.concurrency + args.grpc_concurrency)
    length = args.prompt + max(args.steps, args.grpc_steps)
    if length > config.max_seq_len or 2 * (args.gen_prompt + args.gen_tokens) > config.max_seq_len:
        raise SystemExit(f"prompt + steps, and 2 * (gen prompt + gen tokens), must fit the context of "
                         f"{config.max_seq_len}")
    ids = np.random.default_rng(args.seed).integers(0, config.vocab_size, (most, length))
    rows = family.handoff(ids, 0).numpy()  # (sessions, positions, hidden): each session's hand-off rows
    print(f"{args.label} family ({config.num_layers} layers, hidden {config.hidden_size}), sessions continue "
          f"after exit 0 through blocks {config.exits[0] + 1}..{config.num_layers - 1}; {args.threads} threads")

    with tempfile.TemporaryDirectory(prefix="cloud_throughput-") as temp:
        work = Path(temp)
        family_dir = args.family or work / "family"
        if args.family is None:
            family.save(family_dir)
        family_hash = family.family_hash()

        print("\n== engine: batched vs one at a time", flush=True)
        engine_rows = engine_level(family, rows, args)

        # (label, workers, rows per step, concurrency, no engine, streaming)
        servers = [("in-process" if w == 0 else f"{w} workers", w, 2048, args.grpc_concurrency,
                    False, True) for w in args.grpc_workers]
        baseline = [c for c in args.grpc_concurrency if c <= args.grpc_baseline_max]
        if baseline:  # the in-process engine, one row per step
            servers.append(("one at a time", 0, 1, baseline, False, True))
        servers.append((FRONT_END_ALONE, 0, 2048, args.grpc_concurrency, True, True))
        if args.grpc_calls:  # what a Continue call per request costs against the streams
            if 0 in args.grpc_workers:
                servers.append((f"in-process, {A_CALL_EACH}", 0, 2048, args.grpc_concurrency,
                                False, False))
            servers.append((f"{FRONT_END_ALONE}, {A_CALL_EACH}", 0, 2048, args.grpc_concurrency,
                            True, False))
        grpc = {}
        for label, workers, batch_rows, concurrency, no_engine, streaming in servers:
            print(f"\n== gRPC: {label}", flush=True)
            opened = time.perf_counter()
            with server_process(family_dir, args, workers, batch_rows, max(args.grpc_concurrency),
                                no_engine) as (address, pid):
                ready = time.perf_counter() - opened
                grpc[label] = {"workers": workers, "max_batch_rows": batch_rows, "server_start_s": ready,
                               "worker_torch_threads": max(1, args.threads // workers) if workers else None,
                               "no_engine": no_engine, "streaming": streaming,
                               "rows": grpc_level(address, family_hash, rows, args, label,
                                                  concurrency, streaming, pid)}

        print("\n== generation: engine vs transformers", flush=True)
        model = transformers_model(family, work)
        gen = generation(family, family_dir, model, args)

    # gRPC answers should be the engine's: compare each client's last-round tokens with the engine
    # reference (a one-at-a-time engine round on the same rows).
    reference = engine_reference_tokens(family, rows, args)
    for data in grpc.values():
        for row in data["rows"]:
            got = row.pop("tokens")
            if data["no_engine"]:  # its token 0 is no model's
                continue
            same = [a == b for i, toks in enumerate(got) for a, b in zip(toks, reference[i], strict=True)]
            row["token_agreement_vs_engine"] = sum(same) / len(same)

    # what reaches the clients of the engine's own batched tokens/s, at the same concurrency
    engine_at = {r["sessions"]: r["batched"]["decode_tokens_per_s"] for r in engine_rows}
    for data in grpc.values():
        for row in data["rows"]:
            if row["clients"] in engine_at:
                row["over_engine_batched"] = row["tokens_per_s"] / engine_at[row["clients"]]

    print_tables(engine_rows, grpc, gen)
    at = next((r for r in engine_rows if r["sessions"] == TARGET_AT), None)
    verdict = None
    if at is not None:
        verdict = at["decode_ratio"] >= TARGET_RATIO
        print(f"\nbatched / one at a time at {TARGET_AT} sessions: {at['decode_ratio']:.1f}x "
              f"(target >= {TARGET_RATIO:g}x: {'met' if verdict else 'NOT met'})")

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "serve_spec"}
    path = write_json(args.name, {
        "command": shlex.join(["python", "bench/cloud_throughput.py", *sys.argv[1:]]),
        "args": settings, "threads": args.threads, "versions": versions(), "cpu_count": os.cpu_count(),
        "load_average_1_5_15min": {"before": load_before, "after": os.getloadavg()},
        "family": {"preset": None if args.family else args.preset,
                   "directory": str(args.family) if args.family else None,
                   "config": config.to_dict(), "from_exit": 0,
                   "blocks_served": [config.exits[0] + 1, config.num_layers - 1],
                   "heads_sharpened": None if args.family else 25.0, "seed": args.seed},
        "target": {"ratio": TARGET_RATIO, "at_sessions": TARGET_AT,
                   "ratio_measured": None if at is None else at["decode_ratio"], "met": verdict},
        "definitions": {
            "decode_tokens_per_s": "single-row continue requests answered per second during the decode "
                                   "phase (each session's next request is sent after its answer); median "
                                   "over rounds",
            "catch_up_rows_per_s": "prompt rows per second of the catch-up (one request of `prompt` rows "
                                   "per session)",
            "engine_batched": "all sessions submit, then Engine.step() serves them together",
            "engine_one_at_a_time": "each request submitted and stepped alone, in turn",
            "engine_latency": "from the moment all of a step's requests are due to each one's answer",
            "decode_ratio": "batched / one-at-a-time decode tokens/s, median of per-round ratios (the "
                            "modes alternate round by round)",
            "grpc": "server in a child process (ServerThread), C clients (clients_in: each a process "
                    "of its own, or threads of this process), each its own GrpcTier channel and "
                    "session; round 0 is a warm-up; tokens/s = C * grpc_steps / round wall time; "
                    "latency = each continue_ call as the client sees it",
            "over_engine_batched": "gRPC tokens/s / the engine's batched decode tokens/s at the same "
                                   "concurrency (part 1, no network): the share the front end delivers",
            "decode_stage_seconds": "seconds per engine stage over the batched decode phases of every "
                                    "round (Engine.stats()['stage_seconds'])",
            "grpc_front_end_alone": "the same front end over an engine client without a model "
                                    "(bench/throughput_grpc.py NoEngine: every continue answered at once): "
                                    "calls/s the front end and the clients alone reach on this machine, the "
                                    "ceiling of any engine behind it; its over_engine_batched is the most "
                                    "gRPC could deliver of the engine's tokens/s here",
            "grpc_one_at_a_time": "the in-process engine with EngineLimits(max_batch_rows=1): one row per "
                                  "engine step",
            "server_cpu_ms_per_request": "CPU of the server process and its engine workers over a "
                                         "gRPC run (catch-up, warm-up and timed rounds) per request "
                                         "of the run",
            "client_cpu_ms_per_request": "CPU of the clients in their timed rounds per timed request",
            "streaming": "true: each client sends its requests on one ContinueStream per session (what "
                         "GrpcTier does); false ('a call each'): one Continue call per request",
            "token_agreement": "fraction of greedy tokens equal between the two ways (near ties of "
                               "batched float noise aside, 1.0)",
            "generation": "new tokens / wall seconds of one call, prompt included, greedy; median over "
                          "rounds in which the runners take turns; transformers runs the family's last "
                          "member exported with Family.export_hf, loaded by AutoModelForCausalLM",
        },
        "clients_in": args.clients_in,
        "cores": {"mode": args.cores, "server": args.server_cpus, "clients": args.client_cpus},
        "engine": engine_rows, "grpc": grpc, "generation": gen,
        "wall_seconds": time.perf_counter() - started})
    save_figure(plot(engine_rows, grpc, gen, args), args.name)
    print(f"\nwrote {path} and {RESULTS / (args.name + '.png')} in {time.perf_counter() - started:.0f} s")
    differing = different_tokens(engine_rows, grpc, gen)
    if differing:
        raise SystemExit("paths that should give the same tokens did not: " + "; ".join(differing)
                         + f" (see {path})")


def different_tokens(engine_rows: list[dict], grpc: dict, gen: dict) -> list[str]:
    """Every timed path whose greedy tokens are not all its reference's: batched against one at
    a time, gRPC against the engine, the engine against transformers."""
    differing = [f"engine batched at {r['sessions']}: {r['token_agreement_batched_vs_one']:.3f}"
                 for r in engine_rows if r["token_agreement_batched_vs_one"] < 1]
    differing += [f"gRPC {label} at {r['clients']}: {r['token_agreement_vs_engine']:.3f}"
                  for label, data in grpc.items() for r in data["rows"]
                  if r.get("token_agreement_vs_engine", 1) < 1]
    differing += [f"generation {label}: {same:.3f}"
                  for label, same in gen["token_agreement_vs_transformers"].items() if same < 1]
    return differing




if __name__ == "__main__":
    main()
