"""The cloud throughput benchmark's serving level: whole-model generation requests of mixed prompt
and output lengths arriving over time, served by the engine (continuous batching) and by a static
batcher around `transformers`' generate (bench/cloud_throughput.py, part 4).

The requests: --arrive-requests of them, prompt lengths drawn uniformly from
gen_prompt/4 .. 2 * gen_prompt and output lengths from gen_tokens/4 .. 2 * gen_tokens, random token
ids (one seeded draw, the same for every runner). Two schedules:

- all at once: every request due at t = 0;
- arriving: Poisson arrivals spread over --arrive-span times the seconds the engine needs to serve
  all of them at once (measured first), so that the tier is loaded, neither idle between requests
  nor handed everything at the start.

The runners, on the real clock (each request is submitted no earlier than it is due):

- engine: `Engine.submit_generate` as each request comes due, `step()` whenever there is work,
  each request's own output length (`max_new_tokens`);
- static batch: whenever idle, one `generate` call on every request that has arrived: prompts
  left-padded to the longest, every row generating the longest output of the batch (a static batch
  waits for its longest member); the requests that arrive meanwhile wait for the next call.

Tokens/s = the requests' output tokens / seconds from the first arrival to the last completion.
Latency = each request's completion minus its arrival (the time to its last token).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
from common import token_agreement, transformers_greedy
from throughput_engine import OWNER, latency_summary


@dataclass(frozen=True)
class Request:
    prompt: list[int]
    new_tokens: int


def draw_requests(vocab_size: int, args) -> list[Request]:
    rng = np.random.default_rng(args.seed + 2)
    lengths = rng.integers(max(1, args.gen_prompt // 4), 2 * args.gen_prompt + 1, args.arrive_requests)
    outputs = rng.integers(max(1, args.gen_tokens // 4), 2 * args.gen_tokens + 1, args.arrive_requests)
    return [Request(rng.integers(0, vocab_size, int(n)).tolist(), int(m)) for n, m in zip(lengths, outputs, strict=True)]


def arrival_times(count: int, span_s: float, seed: int) -> list[float]:
    """`count` Poisson arrivals from t = 0, scaled to end at `span_s` (the first at 0)."""
    gaps = np.random.default_rng(seed + 3).exponential(1.0, count - 1)
    times = np.concatenate([[0.0], np.cumsum(gaps)])
    return (times * (span_s / times[-1] if times[-1] > 0 else 0.0)).tolist()


def _wait_until(moment: float) -> None:
    delay = moment - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


def serve_engine(engine, requests: list[Request], due: list[float]) -> dict:
    """Requests submitted to the engine as they come due; completions and tokens."""
    start = time.perf_counter()
    done_at: dict[int, float] = {}
    works, submitted = [], 0
    while len(done_at) < len(requests):
        now = time.perf_counter() - start
        while submitted < len(requests) and due[submitted] <= now:
            index = submitted
            works.append(engine.submit_generate(
                OWNER, requests[index].prompt, requests[index].new_tokens,
                on_done=lambda work, index=index: done_at.__setitem__(index, time.perf_counter() - start)))
            submitted += 1
        if engine.has_work():
            engine.step()
        elif submitted < len(requests):
            _wait_until(start + due[submitted])
    for work in works:
        if work.error is not None:
            raise work.error
    return {"completed_s": [done_at[i] for i in range(len(requests))], "tokens": [w.result for w in works]}


def serve_static(model, requests: list[Request], due: list[float]) -> dict:
    """A static batcher: whenever idle, one left-padded `generate` on everything that has arrived,
    to the batch's longest output."""
    start = time.perf_counter()
    completed, tokens = [0.0] * len(requests), [[] for _ in requests]
    served, batches = 0, []
    while served < len(requests):
        _wait_until(start + due[served])
        now = time.perf_counter() - start
        batch = [i for i in range(served, len(requests)) if due[i] <= now]
        longest = max(requests[i].new_tokens for i in batch)
        out = transformers_greedy(model, [requests[i].prompt for i in batch], longest)
        finished = time.perf_counter() - start
        for row, i in enumerate(batch):
            completed[i] = finished
            tokens[i] = out[row][:requests[i].new_tokens]
        batches.append(len(batch))
        served += len(batch)
    return {"completed_s": completed, "tokens": tokens, "batches": batches}


def summarise(requests: list[Request], due: list[float], outcome: dict) -> dict:
    wall = max(outcome["completed_s"]) - min(due)
    latencies = [done - arrived for done, arrived in zip(outcome["completed_s"], due, strict=True)]
    row = {"tokens_per_s": sum(r.new_tokens for r in requests) / wall, "wall_s": wall,
           "latency": latency_summary(latencies)}
    if "batches" in outcome:
        row["batch_sizes"] = outcome["batches"]
    return row


def arrivals(family, model, args) -> dict:
    """Engine against the static batcher, all at once and arriving over time."""
    from cloud.engine import Engine, EngineLimits

    requests = draw_requests(family.config.vocab_size, args)
    longest = max(len(r.prompt) + r.new_tokens for r in requests)
    engine = Engine(family, limits=EngineLimits(max_sessions=len(requests), max_context=longest + 1,
                                                max_rows_per_request=longest))
    at_once = [0.0] * len(requests)
    serve_engine(engine, requests[:2], at_once[:2])  # warm-up
    serve_static(model, requests[:2], at_once[:2])
    span = args.arrive_span * serve_engine(engine, requests, at_once)["completed_s"][-1]
    arriving = arrival_times(len(requests), span, args.seed)
    schedules = {"all_at_once": at_once, "arriving": arriving}
    runners = {"engine": lambda due: serve_engine(engine, requests, due),
               "static_batch": lambda due: serve_static(model, requests, due)}
    result = {"requests": len(requests), "prompt_tokens": [len(r.prompt) for r in requests],
              "new_tokens": [r.new_tokens for r in requests], "arrival_span_s": span,
              "arrivals_s": arriving, "schedules": {}}
    for schedule, due in schedules.items():
        runs: dict[str, list[dict]] = {name: [] for name in runners}
        tokens = {}
        names = list(runners)
        for index in range(args.arrive_rounds):  # the runners take turns, the order rotating
            for name in names[index % 2:] + names[:index % 2]:
                outcome = runners[name](due)
                runs[name].append(summarise(requests, due, outcome))
                tokens[name] = outcome["tokens"]
        cell = {}
        for name, rows in runs.items():
            median = statistics.median(r["tokens_per_s"] for r in rows)
            chosen = min(rows, key=lambda r: abs(r["tokens_per_s"] - median))
            cell[name] = {**chosen, "tokens_per_s_rounds": [r["tokens_per_s"] for r in rows]}
        cell["engine_over_static_batch"] = cell["engine"]["tokens_per_s"] / cell["static_batch"]["tokens_per_s"]
        cell["token_agreement_engine_vs_static_batch"] = token_agreement(tokens["engine"], tokens["static_batch"])
        result["schedules"][schedule] = cell
        print(f"   {schedule:>12}: engine {cell['engine']['tokens_per_s']:7.0f} tok/s, static batch "
              f"{cell['static_batch']['tokens_per_s']:7.0f} tok/s ({cell['engine_over_static_batch']:.2f}x); "
              f"p50 to last token {cell['engine']['latency']['p50_ms']:.0f} / "
              f"{cell['static_batch']['latency']['p50_ms']:.0f} ms; same tokens "
              f"{cell['token_agreement_engine_vs_static_batch']:.3f}", flush=True)
    return result
