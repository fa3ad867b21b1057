"""The benchmarks' own machinery, where a mistake would make a README figure wrong: the serving
runners (bench/serving_runs.py) against the family recomputed from token ids, and the check that
makes bench/cloud_throughput.py fail when paths disagree."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from builders import sharpen_heads, tiny_config
from flow import Family
from greedy import greedy

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def bench():
    """The bench modules by name (they import their siblings, so bench/ is on the path)."""
    sys.path.insert(0, str(BENCH))
    try:
        yield lambda name: importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def family() -> Family:
    return sharpen_heads(Family.random(tiny_config(), seed=3))


def test_different_tokens_names_every_path_that_left_its_reference(bench):
    """Catches: a benchmark that reports a throughput for a path whose tokens were wrong."""
    different_tokens = bench("cloud_throughput").different_tokens
    engine_rows = [{"sessions": 1, "token_agreement_batched_vs_one": 1.0},
                   {"sessions": 32, "token_agreement_batched_vs_one": 0.97}]
    grpc = {"in-process": {"rows": [{"clients": 32, "token_agreement_vs_engine": 1.0},
                                    {"clients": 4, "token_agreement_vs_engine": 0.5}]},
            "front end alone": {"rows": [{"clients": 32}]}}  # no model: no tokens to compare
    generation = {"token_agreement_vs_transformers": {"engine_batch1": 1.0, "engine_batch8": 0.99}}
    assert different_tokens(engine_rows, grpc, generation) == [
        "engine batched at 32: 0.970", "gRPC in-process at 4: 0.500", "generation engine_batch8: 0.990"]
    engine_rows[1]["token_agreement_batched_vs_one"] = 1.0
    grpc["in-process"]["rows"][1]["token_agreement_vs_engine"] = 1.0
    generation["token_agreement_vs_transformers"]["engine_batch8"] = 1.0
    assert different_tokens(engine_rows, grpc, generation) == []


def test_lengths_stretch_with_the_spread_and_stay_in_bounds(bench):
    draw_lengths = bench("serving_runs").draw_lengths
    assert draw_lengths(50, 24, 0.0, seed=1) == [24] * 50
    narrow, wide = draw_lengths(200, 24, 0.5, seed=1), draw_lengths(200, 24, 1.0, seed=1)
    assert min(wide) >= 1 and max(wide) <= 8 * 24 and np.std(wide) > 1.5 * np.std(narrow)
    # the same requests, stretched: the order of their lengths does not change
    assert all((a - b) * (c - d) >= 0 for a, b, c, d in zip(narrow, narrow[1:], wide, wide[1:], strict=False))


def _continuation_rows(family, requests, longest):
    """Each request's hand-off rows after exit 0 for its prompt and `longest` tokens after it,
    and the full model's argmax at each of those positions (teacher-forced, from token ids)."""
    rows, expected = [], []
    for i, request in enumerate(requests):
        ids = request.prompt + np.random.default_rng(100 + i).integers(0, 97, longest).tolist()
        rows.append(family.handoff(ids, 0)[0].numpy())
        with torch.no_grad():
            argmax = family.logits(ids, exit=family.config.last_exit)[0].argmax(-1).tolist()
        start = len(request.prompt) - 1  # the catch-up answers the prompt's last position
        expected.append(argmax[start:start + request.new_tokens])
    return rows, expected


def test_continuation_runners_send_each_row_at_its_position(bench, family):
    """Catches: a runner off by one position (the tokens would be another position's), a static
    batch that stops computing its finished rows, or one that takes more than its slots."""
    from cloud.engine import Engine, EngineLimits

    runs = bench("serving_runs")
    requests = runs.draw_requests(97, 7, 5, 4, 1.0, seed=2)
    longest = max(r.new_tokens for r in requests)
    rows, expected = _continuation_rows(family, requests, longest)
    engine = Engine(family, limits=EngineLimits(
        max_sessions=3, max_context=max(len(r.prompt) for r in requests) + longest))
    due = [0.0, 0.0, 0.0, 0.0, 0.01, 0.02, 0.02]

    served = runs.continue_on_engine(engine, rows, requests, due, slots=3)
    assert served["tokens"] == expected
    assert all(done >= arrived for done, arrived in zip(served["completed_s"], due, strict=True))

    before = engine.stats()["rows"]
    static = runs.continue_static(engine, rows, requests, due, slots=3)
    assert static["tokens"] == expected
    assert max(static["batches"]) == 3 and sum(static["batches"]) == len(requests)
    # each batch: its prompts, then a row per step for every member until its longest is done
    batches, start = [], 0
    for size in static["batches"]:
        batches.append(requests[start:start + size])
        start += size
    assert engine.stats()["rows"] - before == sum(
        sum(len(r.prompt) for r in batch) + len(batch) * (max(r.new_tokens for r in batch) - 1)
        for batch in batches)
    assert engine.stats()["sessions"] == 0  # every session closed


def test_generation_runners_give_the_full_models_greedy_tokens(bench, family, tmp_path):
    from cloud.engine import Engine, EngineLimits

    runs, common = bench("serving_runs"), bench("common")
    requests = runs.draw_requests(97, 5, 4, 5, 1.0, seed=4)
    expected = [greedy(family, family.config.last_exit, r.prompt, r.new_tokens) for r in requests]
    engine = Engine(family, limits=EngineLimits(max_sessions=2, max_context=64))
    due = [0.0, 0.0, 0.0, 0.01, 0.03]
    assert runs.generate_on_engine(engine, requests, due, slots=2)["tokens"] == expected
    static = runs.generate_static(common.transformers_model(family, tmp_path), requests, due, slots=2)
    assert static["tokens"] == expected and max(static["batches"]) == 2
    assert engine.stats()["generations"] == 0
