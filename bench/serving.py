"""Serving: the engine's continuous batching against a static batch, on requests of mixed lengths.

A static batch waits for its longest member: every row runs to the batch's longest output, and
what arrives meanwhile waits for the next batch. The engine admits a request as soon as a slot is
free and frees the slot at the request's last token. What that buys depends on how widely the
lengths spread, so the benchmark sweeps the spread.

The requests: --requests of them, prompt and output lengths log-normal around --prompt and
--tokens (the medians), the standard deviation of their logarithm each --spreads value (0: every
request the same length), clipped to 8x the median; random token ids; one seeded draw stretched by
each spread. At most --slots requests run at once on either side (the engine's KV slots, the
static batch's rows); the rest wait in arrival order. The default keeps 4x as many requests as
slots: with no more requests than slots, the longest request's own decode, at a batch of one, is
most of the run on either side, and the run measures that one request. Two schedules:

- all at once: every request due at t = 0 (the offline throughput);
- arriving: Poisson arrivals over --arrive-span times the seconds the engine needed for all at
  once, so requests come faster than either side serves them.

Two kinds of request (bench/serving_runs.py has the runners):

- generate: whole-model greedy generation from token ids. The static batch is `transformers`'
  generate on the family's last member exported with `Family.export_hf`, on whatever has arrived
  (up to --slots), left-padded, to the batch's longest output.
- continue: a device's hand-off rows after exit 0 (the rows the family computes for the request's
  tokens): the catch-up, then one row per answer. The static batch is the same engine serving in
  batches whose finished rows keep running until the batch's longest is done.

Tokens/s = the requests' output tokens / seconds from the first arrival to the last completion;
latency = each request's completion minus its arrival. Each cell takes the median of --rounds
rounds in which the two sides take turns.

    python bench/serving.py                 # demo family, about 5 minutes on 2 cores
    python bench/serving.py --quick         # tiny family, under a minute: checks the script
    python bench/serving.py --family runs/smollm2/family --requests 32 --slots 8 --spreads 0 1

Writes bench/results/serving.{json,png}.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import (
    REPO,
    RESULTS,
    parse_with_quick,
    save_figure,
    token_agreement,
    transformers_model,
    write_json,
)
from serving_runs import (
    arrival_times,
    continue_on_engine,
    continue_static,
    draw_requests,
    generate_on_engine,
    generate_static,
)
from throughput_engine import latency_summary

NAME = "serving"
TARGET = 3.0  # engine / static batch tokens/s, arriving, at the widest spread
KINDS = ("generate", "continue")
QUICK = dict(preset="tiny", requests=8, slots=4, prompt=6, tokens=6, spreads=[0.0, 1.0], rounds=1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo", help="family architecture preset (default: %(default)s)")
    parser.add_argument("--family", type=Path, help="measure this family directory instead of a random --preset")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=128, help="requests per run (default: %(default)s)")
    parser.add_argument("--slots", type=int, default=32,
                        help="requests running at once, on either side (default: %(default)s)")
    parser.add_argument("--prompt", type=int, default=24, help="median prompt tokens (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=24, help="median new tokens (default: %(default)s)")
    parser.add_argument("--spreads", type=float, nargs="+", default=[0.0, 0.5, 1.0],
                        help="standard deviations of the log lengths (default: %(default)s)")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS),
                        help="request kinds (default: %(default)s)")
    parser.add_argument("--arrive-span", type=float, default=0.5,
                        help="arrivals spread over this fraction of the engine's time for all at once "
                             "(default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds per side and cell, median taken (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny family and few requests (< 60 s)")
    parser.add_argument("--name", default=NAME, help="results file name under bench/results (default: %(default)s)")
    args = parse_with_quick(parser, QUICK, argv)
    for name in ("threads", "requests", "slots", "prompt", "tokens", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if min(args.spreads) < 0 or args.arrive_span < 0:
        parser.error("--spreads and --arrive-span must be >= 0")
    return args


def summarise(outcome: dict, due: list[float], new_tokens: list[int]) -> dict:
    wall = max(outcome["completed_s"]) - min(due)
    row = {"tokens_per_s": sum(new_tokens) / wall, "wall_s": wall,
           "latency": latency_summary([done - arrived for done, arrived in
                                       zip(outcome["completed_s"], due, strict=True)])}
    if "batches" in outcome:
        row["batch_sizes"] = outcome["batches"]
    return row


def measure(runners: dict, due: list[float], new_tokens: list[int], rounds: int) -> dict:
    """Both sides on one schedule, taking turns round by round; the median round of each."""
    runs: dict[str, list[dict]] = {name: [] for name in runners}
    tokens = {}
    names = list(runners)
    for index in range(rounds):
        for name in names[index % 2:] + names[:index % 2]:
            outcome = runners[name](due)
            runs[name].append(summarise(outcome, due, new_tokens))
            tokens[name] = outcome["tokens"]
    cell = {}
    for name, rows in runs.items():
        median = statistics.median(r["tokens_per_s"] for r in rows)
        chosen = min(rows, key=lambda r: abs(r["tokens_per_s"] - median))
        cell[name] = {**chosen, "tokens_per_s_rounds": [r["tokens_per_s"] for r in rows]}
    cell["engine_over_static"] = cell["engine"]["tokens_per_s"] / cell["static"]["tokens_per_s"]
    cell["token_agreement"] = token_agreement(tokens["engine"], tokens["static"])
    return cell


def handoff_rows(family, prompt: list[int], extra: int, seed: int) -> np.ndarray:
    """The hand-off rows after exit 0 of `prompt` and `extra` random tokens after it: the rows a
    device would send (the tokens after the prompt are not the answers, which only changes what
    the rows say, not what serving them costs)."""
    tail = np.random.default_rng(seed).integers(0, family.config.vocab_size, extra).tolist()
    return family.handoff(prompt + tail, 0)[0].detach().float().numpy()


def runners_for(kind: str, family, model, engine, requests: list, args) -> dict:
    """The two sides for one kind of request; each serves the first len(due) requests."""
    if kind == "generate":
        return {"engine": lambda due: generate_on_engine(engine, requests[:len(due)], due, args.slots),
                "static": lambda due: generate_static(model, requests[:len(due)], due, args.slots)}
    # each request's hand-off rows, past its own end to the longest output (a static batch runs on)
    longest = max(r.new_tokens for r in requests)
    rows = [handoff_rows(family, r.prompt, longest, args.seed + i) for i, r in enumerate(requests)]
    return {"engine": lambda due: continue_on_engine(engine, rows, requests[:len(due)], due, args.slots),
            "static": lambda due: continue_static(engine, rows, requests[:len(due)], due, args.slots)}


def sweep(family, model, args) -> dict:
    """Every kind and spread, all at once then arriving."""
    from cloud.engine import Engine, EngineLimits

    results: dict = {kind: {} for kind in args.kinds}
    for spread in args.spreads:
        requests = draw_requests(family.config.vocab_size, args.requests, args.prompt, args.tokens,
                                 spread, args.seed)
        prompts = [len(r.prompt) for r in requests]
        new_tokens = [r.new_tokens for r in requests]
        longest = max(new_tokens)
        context = max(prompts) + longest
        if context > family.config.max_seq_len:
            raise SystemExit(f"spread {spread:g}: a prompt of {max(prompts)} and an output of {longest} "
                             f"tokens exceed the context of {family.config.max_seq_len}; lower "
                             f"--prompt/--tokens or the spread")
        engine = Engine(family, limits=EngineLimits(max_sessions=args.slots, max_context=context,
                                                    max_rows_per_request=max(prompts)))
        for kind in args.kinds:
            runners = runners_for(kind, family, model, engine, requests, args)
            for runner in runners.values():  # warm-up
                runner([0.0] * min(2, len(requests)))
            at_once = [0.0] * len(requests)
            cells = {"all_at_once": measure(runners, at_once, new_tokens, args.rounds)}
            span = args.arrive_span * cells["all_at_once"]["engine"]["wall_s"]
            arriving = arrival_times(len(requests), span, args.seed)
            cells["arriving"] = measure(runners, arriving, new_tokens, args.rounds)
            results[kind][f"{spread:g}"] = {
                "spread": spread, "prompt_tokens": prompts, "new_tokens": new_tokens,
                "arrival_span_s": span, "arrivals_s": arriving, "schedules": cells}
            for schedule, cell in cells.items():
                print(f"   {kind:>8} spread {spread:<4g} {schedule:>12}: engine "
                      f"{cell['engine']['tokens_per_s']:7.0f} tok/s, static {cell['static']['tokens_per_s']:7.0f} "
                      f"({cell['engine_over_static']:.2f}x); p50 to last token "
                      f"{cell['engine']['latency']['p50_ms']:.0f} / {cell['static']['latency']['p50_ms']:.0f} ms; "
                      f"same tokens {cell['token_agreement']:.3f}", flush=True)
    return results


def plot(results: dict, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for k, (kind, by_spread) in enumerate(results.items()):
        spreads = [cell["spread"] for cell in by_spread.values()]
        for schedule, style in (("all_at_once", "--"), ("arriving", "-")):
            ratios = [cell["schedules"][schedule]["engine_over_static"] for cell in by_spread.values()]
            axis.plot(spreads, ratios, style, marker="o", color=f"C{k}",
                      label=f"{kind}, {schedule.replace('_', ' ')}")
    axis.axhline(1.0, color="grey", linewidth=0.8)
    axis.axhline(TARGET, color="grey", linewidth=0.8, linestyle=":", label=f"{TARGET:g}x")
    axis.set_xlabel("spread of lengths (standard deviation of log length)")
    axis.set_ylabel("engine tokens/s ÷ static batch tokens/s")
    axis.set_title(f"{args.requests} requests, {args.slots} at once, median {args.prompt} prompt + "
                   f"{args.tokens} new tokens", fontsize=10)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def main() -> None:
    args = parse_args()
    import torch

    from flow.config import preset
    from flow.family import Family

    sys.path.insert(0, str(REPO / "tests"))
    from builders import sharpen_heads

    torch.set_num_threads(args.threads)
    started, load_before = time.perf_counter(), os.getloadavg()
    if args.family is not None:
        family, label = Family.load(args.family), str(args.family)
    else:
        family, label = sharpen_heads(Family.random(preset(args.preset), seed=args.seed)), args.preset
    print(f"{label} family ({family.config.num_layers} layers, hidden {family.config.hidden_size}); "
          f"{args.requests} requests, {args.slots} at once; {args.threads} threads", flush=True)
    with tempfile.TemporaryDirectory(prefix="serving-") as temp, torch.no_grad():
        model = transformers_model(family, Path(temp)) if "generate" in args.kinds else None
        results = sweep(family, model, args)

    widest = f"{max(args.spreads):g}"
    verdicts = {kind: results[kind][widest]["schedules"]["arriving"]["engine_over_static"] >= TARGET
                for kind in results}
    for kind, met in verdicts.items():
        ratio = results[kind][widest]["schedules"]["arriving"]["engine_over_static"]
        print(f"{kind}, arriving, spread {widest}: engine / static {ratio:.2f}x "
              f"(target >= {TARGET:g}x: {'met' if met else 'NOT met'})")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    path = write_json(args.name, {
        "command": shlex.join(["python", "bench/serving.py", *sys.argv[1:]]),
        "args": settings, "load_average_1_5_15min": {"before": load_before, "after": os.getloadavg()},
        "family": {"label": label, "config": family.config.to_dict(),
                   "heads_sharpened": None if args.family else 25.0},
        "target": {"engine_over_static": TARGET, "at": f"arriving, spread {widest}", "met": verdicts},
        "definitions": {
            "tokens_per_s": "the requests' output tokens / seconds from the first arrival to the last "
                            "completion; median of the rounds (the sides take turns)",
            "latency": "each request's completion minus its arrival (the time to its last token; a "
                       "static batch answers all its requests when it ends)",
            "spread": "standard deviation of the logarithm of the prompt and output lengths, around "
                      "the medians --prompt and --tokens, clipped to 8x the median",
            "static_generate": "transformers generate on the requests that have arrived (up to "
                               "slots), left-padded, to the batch's longest output",
            "static_continue": "the engine serving batches whose finished rows keep running until "
                               "the batch's longest output is done; its prompts are not padded",
            "token_agreement": "share of output tokens equal between engine and static batch (the "
                               "static generate's left padding changes the float noise, so near "
                               "ties may differ)",
        },
        "results": results, "wall_seconds": time.perf_counter() - started})
    save_figure(plot(results, args), args.name)
    print(f"\nwrote {path} and {RESULTS / (args.name + '.png')} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
