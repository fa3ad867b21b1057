"""The cloud throughput benchmark's generation level: whole-model greedy generation by the engine,
through gRPC, and by `transformers`' generate on the same weights (bench/cloud_throughput.py,
part 3)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
from common import token_agreement, transformers_greedy
from throughput_engine import OWNER, context
from throughput_grpc import server_process


def generation(family, family_dir: Path, model, args) -> dict:
    from cloud.engine import Engine, EngineLimits
    from flow.tier_client import GrpcTier

    last = family.config.last_exit
    rng = np.random.default_rng(args.seed + 1)
    prompts = rng.integers(0, family.config.vocab_size, (args.gen_batch, args.gen_prompt)).tolist()
    engine = Engine(family, limits=EngineLimits(max_sessions=args.gen_batch, max_rows_per_request=args.gen_prompt,
                                                max_context=context(args)))
    new = args.gen_tokens

    def run_engine(batch: int) -> list[list[int]]:
        works = [engine.submit_generate(OWNER, prompt, new) for prompt in prompts[:batch]]
        while engine.has_work():
            engine.step()
        return [w.result for w in works]

    def run_hf(batch: int) -> list[list[int]]:
        return transformers_greedy(model, prompts[:batch], new)

    with server_process(family_dir, args, 0, 2048, args.gen_batch) as (address, _):
        tier = GrpcTier(address, timeout=600.0)
        family_hash = family.family_hash()

        def run_grpc(batch: int) -> list[list[int]]:
            return [list(tier.generate(prompts[0], new, family_hash=family_hash))]

        runners = {"engine_batch1": (run_engine, 1), "transformers_batch1": (run_hf, 1),
                   "grpc_engine_batch1": (run_grpc, 1),
                   f"engine_batch{args.gen_batch}": (run_engine, args.gen_batch),
                   f"transformers_batch{args.gen_batch}": (run_hf, args.gen_batch)}
        times: dict[str, list[float]] = {label: [] for label in runners}
        outputs = {label: run(batch) for label, (run, batch) in runners.items()}  # warm-up
        labels = list(runners)
        for index in range(args.gen_rounds):
            turn = index % len(labels)
            for label in labels[turn:] + labels[:turn]:
                run, batch = runners[label]
                time.sleep(0.02)
                started = time.perf_counter()
                run(batch)
                times[label].append(time.perf_counter() - started)
        tier.close()
    result = {"prompt_tokens": args.gen_prompt, "new_tokens": new, "batch": args.gen_batch,
              "hf_member_dir_layers": family.config.member_num_layers(last), "runs": {}}
    for label, (_, batch) in runners.items():
        seconds = statistics.median(times[label])
        result["runs"][label] = {"batch": batch, "median_s": seconds, "seconds_rounds": times[label],
                                 "tokens_per_s": batch * new / seconds}

    hf1 = outputs["transformers_batch1"]
    result["token_agreement_vs_transformers"] = {
        "engine_batch1": token_agreement(outputs["engine_batch1"], hf1),
        "grpc_engine_batch1": token_agreement(outputs["grpc_engine_batch1"], hf1),
        f"engine_batch{args.gen_batch}": token_agreement(
            outputs[f"engine_batch{args.gen_batch}"], outputs[f"transformers_batch{args.gen_batch}"])}
    runs = result["runs"]
    result["engine_over_transformers_batch1"] = (runs["engine_batch1"]["tokens_per_s"]
                                                 / runs["transformers_batch1"]["tokens_per_s"])
    result[f"engine_over_transformers_batch{args.gen_batch}"] = (
        runs[f"engine_batch{args.gen_batch}"]["tokens_per_s"]
        / runs[f"transformers_batch{args.gen_batch}"]["tokens_per_s"])
    return result
