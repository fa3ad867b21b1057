"""The cloud throughput benchmark's engine level: the batched engine against one request at a
time, in one process, no network (bench/cloud_throughput.py, part 1)."""

from __future__ import annotations

import statistics
import time

import numpy as np

OWNER = "bench"


def latency_summary(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "max_ms": float(ms.max()), "calls": int(ms.size)}


def engine_round(engine, sessions: list[str], rows: np.ndarray, prompt: int, steps: int,
                 batched: bool) -> dict:
    """One catch-up and `steps` decode steps of every session, from position 0, in one mode."""
    def serve(requests: list[tuple[str, int, np.ndarray]]) -> tuple[float, list[float], list]:
        """Answer `requests` (all due now); wall seconds, each one's latency, each one's tokens."""
        done_at: dict[int, float] = {}
        works = []
        due = time.perf_counter()
        for index, (session, start, chunk) in enumerate(requests):
            works.append(engine.submit_continue(
                session, OWNER, start, chunk, rollback=True,
                on_done=lambda work, index=index: done_at.__setitem__(index, time.perf_counter())))
            if not batched:
                while not works[-1].done:
                    engine.step()
        while engine.has_work():
            engine.step()
        wall = time.perf_counter() - due
        for work in works:
            if work.error is not None:
                raise work.error
        return wall, [done_at[i] - due for i in range(len(works))], [w.result.tokens for w in works]

    steps_before = engine.stats()["steps"]
    catch_up, _, _ = serve([(s, 0, rows[i, :prompt]) for i, s in enumerate(sessions)])
    decode, latencies, tokens = 0.0, [], [[] for _ in sessions]
    decode_steps = engine.stats()["steps"]
    stages_before = engine.stats()["stage_seconds"]
    for n in range(steps):
        wall, lat, answers = serve([(s, prompt + n, rows[i, prompt + n:prompt + n + 1])
                                    for i, s in enumerate(sessions)])
        decode += wall
        latencies += lat
        for mine, answer in zip(tokens, answers, strict=True):
            mine += answer
    stats = engine.stats()
    return {"catch_up_s": catch_up, "decode_s": decode, "latencies": latencies, "tokens": tokens,
            "catch_up_engine_steps": decode_steps - steps_before,
            "decode_engine_steps": stats["steps"] - decode_steps,
            "decode_stage_seconds": {stage: seconds - stages_before[stage]
                                     for stage, seconds in stats["stage_seconds"].items()}}


def context(args) -> int:
    """Positions a session of this benchmark holds at most: the KV pool is sized to it (a
    family's whole context in every slot would be gigabytes for a pretrained model)."""
    return max(args.prompt + max(args.steps, args.grpc_steps), args.gen_prompt + args.gen_tokens)


def engine_level(family, rows: np.ndarray, args) -> list[dict]:
    from cloud.engine import Engine, EngineLimits

    most = max(args.concurrency)
    engine = Engine(family, limits=EngineLimits(max_sessions=most, max_rows_per_request=args.prompt,
                                                max_batch_rows=max(2048, most * args.prompt),
                                                max_context=context(args)))
    results = []
    for sessions_count in args.concurrency:
        sessions = [engine.open_session(OWNER, 0)[0] for _ in range(sessions_count)]
        warm = min(2, args.steps)
        for batched in (True, False):  # warm-up: first calls of new shapes are slow
            engine_round(engine, sessions, rows, args.prompt, warm, batched)
        runs = {"batched": [], "one_at_a_time": []}
        for index in range(args.rounds):
            order = list(runs)[index % 2:] + list(runs)[:index % 2]
            for mode in order:
                time.sleep(0.02)
                runs[mode].append(engine_round(engine, sessions, rows, args.prompt, args.steps,
                                               mode == "batched"))
        for session in sessions:
            engine.close(session, OWNER)
        results.append(summarise_engine(sessions_count, runs, args))
        row = results[-1]
        print(f"   C={sessions_count:>3}: batched {row['batched']['decode_tokens_per_s']:8.0f} tok/s, "
              f"one at a time {row['one_at_a_time']['decode_tokens_per_s']:7.0f} tok/s, "
              f"ratio {row['decode_ratio']:.1f}", flush=True)
    return results


def summarise_engine(sessions_count: int, runs: dict, args) -> dict:
    decoded, caught_up = sessions_count * args.steps, sessions_count * args.prompt
    row: dict = {"sessions": sessions_count}
    for mode, rounds in runs.items():
        tokens_per_s = [decoded / r["decode_s"] for r in rounds]
        rows_per_s = [caught_up / r["catch_up_s"] for r in rounds]
        row[mode] = {
            "decode_tokens_per_s": statistics.median(tokens_per_s), "decode_tokens_per_s_rounds": tokens_per_s,
            "catch_up_rows_per_s": statistics.median(rows_per_s), "catch_up_rows_per_s_rounds": rows_per_s,
            "decode_engine_steps_per_round": rounds[0]["decode_engine_steps"],
            "catch_up_engine_steps_per_round": rounds[0]["catch_up_engine_steps"],
            "latency": latency_summary([x for r in rounds for x in r["latencies"]]),
            "decode_stage_seconds": {stage: sum(r["decode_stage_seconds"][stage] for r in rounds)
                                     for stage in rounds[0]["decode_stage_seconds"]},
        }
    pairs = list(zip(runs["batched"], runs["one_at_a_time"], strict=True))
    row["decode_ratio_rounds"] = [b_tok / o_tok for b_tok, o_tok in (
        (decoded / b["decode_s"], decoded / o["decode_s"]) for b, o in pairs)]
    row["decode_ratio"] = statistics.median(row["decode_ratio_rounds"])
    row["catch_up_ratio"] = statistics.median(o["catch_up_s"] / b["catch_up_s"] for b, o in pairs)
    # The same greedy tokens either way (up to the float noise of batching: near ties aside).
    same = [a == b for b, o in pairs for ta, tb in zip(b["tokens"], o["tokens"], strict=True)
            for a, b in zip(ta, tb, strict=True)]
    row["token_agreement_batched_vs_one"] = sum(same) / len(same)
    return row


def engine_reference_tokens(family, rows: np.ndarray, args) -> list[list[int]]:
    """Each session's decode tokens from an engine serving it alone."""
    from cloud.engine import Engine, EngineLimits

    count = max(args.grpc_concurrency)
    engine = Engine(family, limits=EngineLimits(max_sessions=count, max_rows_per_request=args.prompt,
                                                max_context=context(args)))
    sessions = [engine.open_session(OWNER, 0)[0] for _ in range(count)]
    return engine_round(engine, sessions, rows, args.prompt, args.grpc_steps, batched=False)["tokens"]
