"""Where an engine step's time goes (`cloud.engine.stages`): every step's time is charged, each
stage with its own work."""

from __future__ import annotations

from builders import handoff_rows, prompt_of
from cloud.engine import Engine, EngineLimits


def test_stage_seconds_account_for_each_step_and_charge_the_stage_that_took_the_time(family,
                                                                                     monkeypatch):
    """Catches: a stage timer that misses part of a step, or charges a slow forward to the wrong
    stage (the per-stage figures would then point at the wrong code)."""
    import time

    engine = Engine(family, limits=EngineLimits(max_sessions=4))
    sessions = [engine.open_session("o", 1)[0] for _ in range(3)]
    prompts = [prompt_of(6 + i, seed=300 + i) for i in range(3)]
    works = [engine.submit_continue(s, "o", 0, handoff_rows(family, p, 1))
             for s, p in zip(sessions, prompts, strict=True)]
    works.append(engine.submit_generate("o", prompt_of(5, seed=310), 4))
    run_blocks = engine.model.run_blocks

    def slow_blocks(*args, **kwargs):
        time.sleep(0.02)
        return run_blocks(*args, **kwargs)

    monkeypatch.setattr(engine.model, "run_blocks", slow_blocks)
    wall = 0
    while engine.has_work():
        began = time.perf_counter()
        engine.step()
        wall += time.perf_counter() - began
    forwards = engine.stats()["forwards"]
    assert all(w.done and w.error is None for w in works)
    stages = engine.stats()["stage_seconds"]
    assert set(stages) == {"schedule", "inputs", "blocks", "head", "answers"}
    assert 0.95 * wall <= sum(stages.values()) <= wall, (stages, wall)
    slept = 0.02 * forwards
    assert stages["blocks"] >= slept >= 0.04, stages  # every forward's sleep, in `blocks`
    assert all(seconds < slept for stage, seconds in stages.items() if stage != "blocks"), stages


def test_a_failed_forward_is_charged_to_the_stage_it_failed_in(family, monkeypatch):
    """Catches: the time of a forward that raised lost to the stage figures, or charged to the
    next group's inputs (a failing model would look like slow input preparation)."""
    import time

    engine = Engine(family, limits=EngineLimits(max_sessions=2))
    session, _ = engine.open_session("o", 1)
    work = engine.submit_continue(session, "o", 0, handoff_rows(family, prompt_of(4, seed=320), 1))

    def failing_blocks(*args, **kwargs):
        time.sleep(0.05)
        raise RuntimeError("out of memory")

    monkeypatch.setattr(engine.model, "run_blocks", failing_blocks)
    began = time.perf_counter()
    engine.step()
    wall = time.perf_counter() - began
    assert work.done and "out of memory" in str(work.error)
    stages = engine.stats()["stage_seconds"]
    assert stages["blocks"] >= 0.05 and stages["inputs"] < 0.05, stages
    assert 0.95 * wall <= sum(stages.values()) <= wall, (stages, wall)

