"""The batched cloud engine against independent references: the full model recomputed from token
ids (`Family.logits`, `tests/greedy.py`), never the engine's own caches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from builders import handoff_rows, prompt_of
from cloud.engine import Engine, EngineLimits
from flow.reference_tier import ReferenceTier
from flow.tier import Exhausted, FrontierMismatch, InvalidRequest, SamplingParams, SessionLost, TierError
from greedy import NEAR_TIE, check_same_greedy, greedy

LAST = 2  # tiny_config's exits are after layers 1, 2, 4: exit 2 is the full model


def run(engine: Engine, limit: int = 1000) -> None:
    for _ in range(limit):
        if not engine.has_work():
            return
        engine.step()
    raise AssertionError("the engine did not finish its work")


def answer(engine: Engine, *args, **kwargs):
    work = engine.submit_continue(*args, **kwargs)
    run(engine)
    assert work.done and work.error is None, work.error
    return work.result


def assert_argmax(logits: torch.Tensor, tokens: list[int]) -> None:
    """`tokens` are the argmax of `logits` (T, vocab) wherever top-1 beats top-2 clearly."""
    top2 = logits.topk(2, dim=-1)
    for i, token in enumerate(tokens):
        if token != int(top2.indices[i, 0]):
            gap = float(top2.values[i, 0] - top2.values[i, 1])
            assert gap < NEAR_TIE, f"position {i}: {token} != {int(top2.indices[i, 0])} (margin {gap:.2e})"


# ---- one session ------------------------------------------------------------------------------


@pytest.mark.parametrize("exit", [0, 1])
def test_one_session_catch_up_then_single_rows(family, exit):
    tokens = prompt_of(30, seed=exit)
    h = handoff_rows(family, tokens, exit)
    expected = family.logits(tokens, exit=LAST)[0]
    engine = Engine(family, limits=EngineLimits(max_sessions=2))
    session, frontier = engine.open_session("alice", exit)
    assert frontier == 0
    got = answer(engine, session, "alice", 0, h[:12], return_all=True, top_k=3)
    assert got.frontier == 12 and got.tier == "" and len(got.tokens) == len(got.top_k) == 12
    assert [t.ids[0] for t in got.top_k] == got.tokens
    torch.testing.assert_close(torch.tensor([t.logits for t in got.top_k]),
                               expected[:12].topk(3).values, rtol=0, atol=1e-4)
    tokens_out = list(got.tokens)
    for position in range(12, 30):
        got = answer(engine, session, "alice", position, h[position:position + 1])
        assert got.frontier == position + 1 and len(got.tokens) == 1 and got.top_k == []
        tokens_out += got.tokens
    assert_argmax(expected, tokens_out)


# ---- many sessions at once ----------------------------------------------------------------------


class Device:
    """A device in one of the modes of DESIGN.md §4, settling `count` tokens after `prompt`.

    `expected` is the full model's greedy output: in `exit` mode the device settles some tokens
    alone (as a confident exit would, correctly) and escalates the pending rows in one chunk; in
    `decode` mode it escalates every token; in `speculative` mode it drafts 3 tokens (one of them
    wrong in most rounds) and keeps the longest prefix the cloud agrees with plus its correction.
    """

    def __init__(self, family, engine, name, exit, prompt, count, mode, expected):
        self.family, self.engine, self.exit, self.mode = family, engine, exit, mode
        self.prompt, self.count, self.expected = prompt, count, expected
        self.tokens = list(prompt)
        self.valid = 0  # positions whose keys the cloud holds for these tokens
        self.round = 0
        self.owner = name
        self.session, _ = engine.open_session(name, exit)
        self.work, self.drafts = None, []

    @property
    def finished(self) -> bool:
        return len(self.tokens) - len(self.prompt) >= self.count

    @property
    def output(self) -> list[int]:
        return self.tokens[len(self.prompt):][:self.count]

    def submit(self) -> None:
        if self.mode == "exit":  # settle 0..3 tokens alone, then escalate them together
            for _ in range([0, 2, 3, 1][self.round % 4]):
                if len(self.tokens) - len(self.prompt) < self.count - 1:
                    self.tokens.append(self.expected[len(self.tokens) - len(self.prompt)])
        self.drafts = self._drafts() if self.mode == "speculative" else []
        sequence = self.tokens + self.drafts
        h = handoff_rows(self.family, sequence, self.exit)[self.valid:]
        self.work = self.engine.submit_continue(
            self.session, self.owner, self.valid, h, return_all=self.mode == "speculative",
            rollback=self.mode == "speculative" and self.round > 0)

    def _drafts(self) -> list[int]:
        done = len(self.tokens) - len(self.prompt)
        drafts = list(self.expected[done:done + 3])
        wrong = self.round % 4  # 3: all drafts right
        if wrong < len(drafts):
            drafts[wrong] = (drafts[wrong] + 1) % 97
        return drafts

    def receive(self) -> None:
        work, self.work = self.work, None
        assert work.done and work.error is None, work.error
        result = work.result
        assert result.frontier == len(self.tokens) + len(self.drafts)
        if self.mode != "speculative":
            self.tokens += result.tokens
            self.valid = result.frontier
        else:
            # Predictions for the rows of the last settled token and of each draft.
            verdicts = result.tokens[-(len(self.drafts) + 1):]
            accepted = 0
            while accepted < len(self.drafts) and verdicts[accepted] == self.drafts[accepted]:
                accepted += 1
            self.tokens += self.drafts[:accepted] + [verdicts[accepted]]
            self.valid = len(self.tokens) - 1  # the correction has not been fed yet
        self.round += 1


def test_32_sessions_interleaved_equal_their_own_full_model_output(family):
    engine = Engine(family, limits=EngineLimits(max_sessions=32))
    modes = ["decode", "exit", "speculative"]
    devices = []
    for i in range(32):
        prompt = prompt_of(3 + (7 * i) % 23, seed=100 + i)
        expected = greedy(family, LAST, prompt, 10)
        devices.append(Device(family, engine, f"owner{i % 4}", i % 2, prompt, 10, modes[i % 3],
                              expected))
    batches = []
    for _ in range(200):
        live = [d for d in devices if not d.finished]
        if not live:
            break
        for device in live:
            if device.work is None:
                device.submit()
        engine.step()
        batches.append(engine.stats()["last_batch"]["chunks"])
        for device in live:
            if device.work is not None and device.work.done:
                device.receive()
    assert all(d.finished for d in devices)
    # Steps really mixed catch-up chunks with single rows, and the two exits' block ranges.
    assert any({c["rows"] == 1 for c in chunks} == {True, False} for chunks in batches)
    assert any({c["first_block"] for c in chunks} == {2, 3} for chunks in batches)
    assert max(len(chunks) for chunks in batches) == 32
    near_ties = []
    for device in devices:
        near_ties += check_same_greedy(family, LAST, device.prompt, device.output, 10)
    assert near_ties == []
    assert engine.stats()["sessions"] == 32 and engine.stats()["queued_work"] == 0


def test_16_decode_steps_take_one_step_and_match_one_at_a_time(family):
    prompts = [prompt_of(5 + i, seed=200 + i) for i in range(16)]
    batched, alone = (Engine(family, limits=EngineLimits(max_sessions=16)) for _ in range(2))
    results = {}
    for engine in (batched, alone):
        sessions = [engine.open_session("o", 1)[0] for _ in prompts]
        for session, prompt in zip(sessions, prompts, strict=True):
            answer(engine, session, "o", 0, handoff_rows(family, prompt, 1))
        nexts = [handoff_rows(family, p + [7], 1)[-1:] for p in prompts]
        if engine is batched:
            works = [engine.submit_continue(s, "o", len(p), h, top_k=4)
                     for s, p, h in zip(sessions, prompts, nexts, strict=True)]
            assert engine.step() == 16 and not engine.has_work()
            assert engine.stats()["last_batch_rows"] == 16
            results[engine] = [w.result for w in works]
        else:
            results[engine] = [answer(engine, s, "o", len(p), h, top_k=4)
                               for s, p, h in zip(sessions, prompts, nexts, strict=True)]
    for one, other in zip(results[batched], results[alone], strict=True):
        assert one.tokens == other.tokens and one.frontier == other.frontier
        assert one.top_k[0].ids == other.top_k[0].ids
        np.testing.assert_allclose(one.top_k[0].logits, other.top_k[0].logits, atol=1e-4)


def test_a_long_catch_up_does_not_pad_the_decode_rows_of_its_step(family):
    """Catches: every chunk of a step padded to its longest, so that one 24-row catch-up made 8
    single-row decode steps compute 8 x 24 positions (and a serving engine under arrivals paid a
    prompt's width on every decode row)."""
    engine = Engine(family, limits=EngineLimits(max_sessions=9))
    prompts = [prompt_of(4 + i, seed=400 + i) for i in range(8)]
    sessions = [engine.open_session("o", 1)[0] for _ in prompts]
    for session, prompt in zip(sessions, prompts, strict=True):
        answer(engine, session, "o", 0, handoff_rows(family, prompt, 1))
    late = prompt_of(24, seed=420)
    late_session, _ = engine.open_session("o", 1)
    before = engine.stats()
    works = [engine.submit_continue(s, "o", len(p), handoff_rows(family, p + [7], 1)[-1:])
             for s, p in zip(sessions, prompts, strict=True)]
    catch_up = engine.submit_continue(late_session, "o", 0, handoff_rows(family, late, 1), return_all=True)
    assert engine.step() == 8 + 24 and not engine.has_work()
    after = engine.stats()
    assert after["forwards"] - before["forwards"] == 2  # the single rows, then the catch-up
    assert after["padding_rows"] - before["padding_rows"] == 0
    assert_argmax(family.logits(late, exit=LAST)[0], catch_up.result.tokens)
    for work, prompt in zip(works, prompts, strict=True):
        assert_argmax(family.logits(prompt + [7], exit=LAST)[0][-1:], work.result.tokens)


def test_a_forward_pads_at_most_twice_its_real_rows():
    """The grouping rule itself: shortest first, a new forward when the next chunk would more than
    double the positions computed per real row; every chunk in exactly one forward."""
    from cloud.engine.requests import Chunk
    from cloud.engine.scheduler import MAX_PADDING_FACTOR, forwards

    class Session:
        def __init__(self, first_layer, generating):
            self.first_layer, self.generating = first_layer, generating

    continuing, generating = Session(2, False), Session(0, True)
    lengths = [1] * 12 + [3, 4, 4, 5, 9, 30, 31, 64]
    chunks = [Chunk(continuing, n, final=True) for n in lengths] + [Chunk(generating, 17, final=True)]
    groups = list(forwards(chunks))
    assert sorted(id(c) for _, _, g in groups for c in g) == sorted(map(id, chunks))
    assert [(first, gen, [c.length for c in g]) for first, gen, g in groups] == [
        (0, True, [17]),
        (2, False, [1] * 12),         # adding the 3: 13 x 3 = 39 > 2 x 15 positions
        (2, False, [3, 4, 4, 5, 9]),  # 5 x 9 = 45 <= 2 x 25; adding the 30: 6 x 30 > 2 x 55
        (2, False, [30, 31, 64])]     # 3 x 64 = 192 <= 2 x 125
    for _, _, group in groups:
        real = sum(c.length for c in group)
        assert len(group) * max(c.length for c in group) <= MAX_PADDING_FACTOR * real


def test_requests_longer_than_a_step_are_split_across_steps(family):
    engine = Engine(family, limits=EngineLimits(max_sessions=4, max_batch_rows=8))
    tokens = prompt_of(40, seed=7)
    session, _ = engine.open_session("o", 0)
    work = engine.submit_continue(session, "o", 0, handoff_rows(family, tokens, 0)[:30], return_all=True)
    generation = engine.submit_generate("o", tokens[:25], 4, None, ())
    steps = 0
    while engine.has_work():
        assert engine.step() <= 8
        steps += 1
    assert steps >= (30 + 25) // 8
    assert_argmax(family.logits(tokens[:30], exit=LAST)[0], work.result.tokens)
    assert check_same_greedy(family, LAST, tokens[:25], generation.result, 4) == []


# ---- whole-model generate -------------------------------------------------------------------


def test_generate_batched_alongside_continuations(family):
    engine = Engine(family, limits=EngineLimits(max_sessions=8))
    prompts = [prompt_of(n, seed=300 + n) for n in (4, 9, 17)]
    streamed = {i: [] for i in range(3)}
    finished = []
    works = [engine.submit_generate("o", p, 12, None, (), on_token=streamed[i].append,
                                    on_done=finished.append) for i, p in enumerate(prompts)]
    # Continuations of two sessions run in the same steps.
    tokens = prompt_of(20, seed=9)
    session, _ = engine.open_session("o", 1)
    h = handoff_rows(family, tokens, 1)
    continued = []
    for position in range(0, 20, 5):
        work = engine.submit_continue(session, "o", position, h[position:position + 5], return_all=True)
        engine.step()
        assert len({c["kind"] for c in engine.stats()["last_batch"]["chunks"]}) == 2
        continued += work.result.tokens
    run(engine)
    assert_argmax(family.logits(tokens, exit=LAST)[0], continued)
    assert finished == works
    near_ties = []
    for i, (prompt, work) in enumerate(zip(prompts, works, strict=True)):
        assert work.result == streamed[i] and len(work.result) == 12
        near_ties += check_same_greedy(family, LAST, prompt, work.result, 12)
    assert near_ties == []
    assert engine.stats()["generations"] == 0 and engine.stats()["free_slots"] == 7


def test_generate_stops_at_a_stop_id_and_at_the_context_end(family):
    engine = Engine(family, limits=EngineLimits(max_sessions=4))
    prompt = prompt_of(6, seed=11)
    expected = greedy(family, LAST, prompt, 8)
    stop = engine.submit_generate("o", prompt, 8, None, (expected[3],))
    long_prompt = prompt_of(family.config.max_seq_len - 3, seed=12)
    end = engine.submit_generate("o", long_prompt, 10, None, ())
    run(engine)
    assert stop.result == expected[:expected.index(expected[3]) + 1]
    assert end.result == greedy(family, LAST, long_prompt, 3)


def test_sampled_generate_is_reproducible_by_seed(family):
    params = SamplingParams(temperature=0.8, top_k=20, top_p=0.95, seed=1234)
    prompt = prompt_of(7, seed=13)
    reference = list(ReferenceTier(family).generate(prompt, 15, params))
    engine = Engine(family, limits=EngineLimits(max_sessions=4))
    alone = engine.submit_generate("o", prompt, 15, params, ())
    run(engine)
    others = [engine.submit_generate("o", prompt_of(5, seed=s), 15, params, ()) for s in (1, 2)]
    batched = engine.submit_generate("o", prompt, 15, params, ())
    run(engine)
    assert alone.result == batched.result == reference
    assert all(len(w.result) == 15 for w in others)


# ---- validation -------------------------------------------------------------------------------


def test_every_validation_rule_raises_and_leaves_sessions_working(family):
    engine = Engine(family, limits=EngineLimits(max_sessions=4, max_rows_per_request=8))
    tokens = prompt_of(12, seed=21)
    h = handoff_rows(family, tokens, 0)
    bystander, _ = engine.open_session("bob", 0)
    answer(engine, bystander, "bob", 0, h[:4])
    session, _ = engine.open_session("alice", 0)
    answer(engine, session, "alice", 0, h[:3])  # frontier 3
    nan = h[3:5].copy()
    nan[1, 7] = np.nan
    bad = {
        "not float32": (InvalidRequest, dict(rows=h[3:5].astype(np.float64))),
        "1-D": (InvalidRequest, dict(rows=h[3])),
        "not an array": (InvalidRequest, dict(rows=h[3:5].tolist())),
        "wrong hidden size": (InvalidRequest, dict(rows=h[3:5, :40])),
        "no rows": (InvalidRequest, dict(rows=h[3:3])),
        "NaN": (InvalidRequest, dict(rows=nan)),
        "infinite": (InvalidRequest, dict(rows=np.full_like(h[3:5], np.inf))),
        "too many rows": (Exhausted, dict(rows=np.zeros((9, 48), np.float32))),
        "negative start": (InvalidRequest, dict(start=-1, rollback=True)),
        "start not an integer": (InvalidRequest, dict(start=3.0)),
        "negative top_k": (InvalidRequest, dict(top_k=-1)),
        "top_k beyond the limit": (InvalidRequest, dict(top_k=257)),
        "start behind frontier": (FrontierMismatch, dict(start=2)),
        "start beyond frontier": (FrontierMismatch, dict(start=5)),
        "rollback beyond frontier": (FrontierMismatch, dict(start=4, rollback=True)),
        "unknown session": (SessionLost, dict(session="no-such-session")),
        "other owner's session": (SessionLost, dict(owner="mallory")),
        "other owner's, unknown": (SessionLost, dict(session=bystander, owner="mallory")),
    }
    for what, (error, change) in bad.items():
        request = dict(session=session, owner="alice", start=3, rows=h[3:5], top_k=0, rollback=False)
        request.update(change)
        with pytest.raises(error) as raised:
            engine.submit_continue(request["session"], request["owner"], request["start"],
                                   request["rows"], top_k=request["top_k"], rollback=request["rollback"])
        assert not engine.has_work(), what
        if error is FrontierMismatch:
            assert raised.value.frontier == 3, what
    # SessionLost reads the same for an unknown id and for another owner's session.
    with pytest.raises(SessionLost) as unknown:
        engine.rollback("x" * 22, "alice", 0)
    with pytest.raises(SessionLost) as foreign:
        engine.rollback(session, "mallory", 0)
    assert str(unknown.value).replace("x" * 22, "ID") == str(foreign.value).replace(session, "ID")
    # Positions past the context.
    roomy = Engine(family, limits=EngineLimits(max_sessions=1, max_rows_per_request=96))
    long, _ = roomy.open_session("alice", 0)
    answer(roomy, long, "alice", 0, np.zeros((90, 48), np.float32))
    with pytest.raises(InvalidRequest, match="context"):
        roomy.submit_continue(long, "alice", 90, np.zeros((7, 48), np.float32))
    assert answer(roomy, long, "alice", 90, np.zeros((6, 48), np.float32)).frontier == 96
    # One queued continue per session.
    work = engine.submit_continue(session, "alice", 3, h[3:5])
    with pytest.raises(InvalidRequest, match="wait"):
        engine.submit_continue(session, "alice", 5, h[5:6])
    with pytest.raises(InvalidRequest, match="wait"):
        engine.rollback(session, "alice", 0)
    run(engine)
    assert work.result.frontier == 5
    # Exits with nothing after them, or not exits at all.
    for exit in (2, 3, -1, "0"):
        with pytest.raises(InvalidRequest):
            engine.open_session("alice", exit)
    # Generate validation.
    for args in (([], 4), ([1, 97], 4), ([1, 2], 0), (list(range(96)), 4), ([1, "a"], 4)):
        with pytest.raises(InvalidRequest):
            engine.submit_generate("alice", *args, None, ())
    with pytest.raises(InvalidRequest, match="temperature"):
        engine.submit_generate("alice", [1, 2], 4, SamplingParams(temperature=-1), ())
    # rollback() never moves forward, and clamps at 0.
    assert engine.rollback(session, "alice", 99) == 5
    assert engine.rollback(session, "alice", -3) == 0
    # Nothing above disturbed either session: both continue exactly.
    expected = family.logits(tokens, exit=LAST)[0]
    got = answer(engine, session, "alice", 0, h[:7], return_all=True)
    assert got.frontier == 7
    assert_argmax(expected[:7], got.tokens)
    got = answer(engine, bystander, "bob", 4, h[4:12], return_all=True)
    assert_argmax(expected[4:12], got.tokens)
    assert engine.stats()["sessions"] == 2


def test_rollback_flag_discards_a_draft_and_continues_exactly(family):
    tokens = prompt_of(16, seed=31)
    wrong = tokens[:10] + [(t + 5) % 97 for t in tokens[10:]]
    engine = Engine(family, limits=EngineLimits(max_sessions=2))
    session, _ = engine.open_session("o", 1)
    assert answer(engine, session, "o", 0, handoff_rows(family, wrong, 1)).frontier == 16
    got = answer(engine, session, "o", 10, handoff_rows(family, tokens, 1)[10:], return_all=True, rollback=True)
    assert got.frontier == 16
    assert_argmax(family.logits(tokens, exit=LAST)[0, 10:], got.tokens)


# ---- the pool ---------------------------------------------------------------------------------


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_full_pool_evicts_the_least_recently_used_idle_session(family):
    clock = FakeClock()  # a clock that never moves: LRU order must not depend on it
    engine = Engine(family, limits=EngineLimits(max_sessions=3), clock=clock)
    h = handoff_rows(family, prompt_of(6, seed=41), 0)
    a, b, c = (engine.open_session("o", 0)[0] for _ in range(3))
    for session in (b, a, c):  # b is now the least recently used
        answer(engine, session, "o", 0, h[:2])
    assert engine.stats()["free_slots"] == 0
    d, _ = engine.open_session("o", 0)
    assert engine.stats()["evictions"] == 1
    with pytest.raises(SessionLost):
        engine.submit_continue(b, "o", 2, h[2:3])
    for session in (a, c):
        assert answer(engine, session, "o", 2, h[2:3]).frontier == 3
    # Every holder busy: nothing may be evicted.
    works = [engine.submit_continue(s, "o", 3 if s != d else 0, h[3:4] if s != d else h[:4])
             for s in (a, c, d)]
    with pytest.raises(Exhausted):
        engine.open_session("o", 0)
    with pytest.raises(Exhausted):
        engine.submit_generate("o", [1, 2, 3], 3, None, ())
    run(engine)
    assert all(w.error is None for w in works)
    engine.close(a, "mallory")  # another owner's close is silently ignored
    engine.close(a, "o")
    engine.close(a, "o")  # idempotent
    assert engine.stats()["free_slots"] == 1 and engine.stats()["evictions"] == 1
    with pytest.raises(SessionLost):
        engine.rollback(a, "o", 0)


def test_idle_sessions_expire_after_the_ttl(family):
    clock = FakeClock()
    engine = Engine(family, limits=EngineLimits(max_sessions=4, session_ttl_s=60), clock=clock)
    h = handoff_rows(family, prompt_of(4, seed=51), 0)
    old, _ = engine.open_session("o", 0)
    clock.now += 40
    recent, _ = engine.open_session("o", 0)
    busy, _ = engine.open_session("o", 0)
    work = engine.submit_continue(busy, "o", 0, h)  # queued work keeps a session alive
    clock.now += 30  # old: idle 70 s, recent: 30 s, busy: queued
    assert engine.expire_idle() == 1 and engine.stats()["expired"] == 1
    with pytest.raises(SessionLost):
        engine.submit_continue(old, "o", 0, h)
    clock.now += 100
    assert engine.expire_idle() == 1  # recent; busy still has queued work
    run(engine)
    assert work.result.frontier == 4
    clock.now += 61
    with pytest.raises(SessionLost):  # stale even before a sweep
        engine.submit_continue(busy, "o", 4, h[:1])
    assert engine.stats()["free_slots"] == 4 and engine.expire_idle() == 0


def test_cancel_frees_the_slot(family):
    engine = Engine(family, limits=EngineLimits(max_sessions=2))
    streamed, finished = [], []
    generation = engine.submit_generate("o", [1, 2, 3], 50, None, (), on_token=streamed.append,
                                        on_done=finished.append)
    engine.step()
    engine.step()
    assert len(streamed) == 2 and engine.stats()["free_slots"] == 1
    engine.cancel(generation)
    assert generation.done and isinstance(generation.error, TierError) and finished == [generation]
    assert engine.stats()["free_slots"] == 2 and not engine.has_work()
    engine.cancel(generation)  # no-op once done
    # A cancelled continue leaves its session idle at its old frontier.
    h = handoff_rows(family, prompt_of(5, seed=61), 1)
    session, _ = engine.open_session("o", 1)
    work = engine.submit_continue(session, "o", 0, h)
    engine.cancel(work)
    assert work.done and work.error is not None and not engine.has_work()
    assert answer(engine, session, "o", 0, h).frontier == 5
    # Closing a session with queued work answers that work.
    work = engine.submit_continue(session, "o", 5, h[:1])
    engine.close(session, "o")
    assert isinstance(work.error, SessionLost) and engine.stats()["free_slots"] == 2


def test_first_layer_limits_what_the_engine_serves(family):
    engine = Engine(family, first_layer=3, limits=EngineLimits(max_sessions=2))
    with pytest.raises(InvalidRequest, match="block 2"):
        engine.open_session("o", 0)  # needs block 2
    with pytest.raises(InvalidRequest, match="every block"):
        engine.submit_generate("o", [1, 2], 3, None, ())
    tokens = prompt_of(8, seed=71)
    session, _ = engine.open_session("o", 1)
    got = answer(engine, session, "o", 0, handoff_rows(family, tokens, 1), return_all=True)
    assert_argmax(family.logits(tokens, exit=LAST)[0], got.tokens)
    full = Engine(family, limits=EngineLimits(max_sessions=2))
    assert engine.stats()["kv_bytes_total"] * 5 == full.stats()["kv_bytes_total"] * 2


def test_max_context_bounds_the_pool_and_the_positions_a_session_holds(family):
    """Catches: a pool allocated for the family's whole context whatever the limit (SmolLM2's
    8192 positions in 64 slots would be 24.5 GB), and positions past the limit accepted (they
    would be written outside the pool) or a generation running past it."""
    engine = Engine(family, limits=EngineLimits(max_sessions=2, max_context=24))
    full = Engine(family, limits=EngineLimits(max_sessions=2))  # the family's 96 positions
    assert engine.stats()["kv_bytes_total"] * 4 == full.stats()["kv_bytes_total"]
    tokens = prompt_of(24, seed=72)
    session, _ = engine.open_session("o", 0)
    got = answer(engine, session, "o", 0, handoff_rows(family, tokens, 0), return_all=True)
    assert_argmax(family.logits(tokens, exit=LAST)[0], got.tokens)  # 24 positions fit, exactly
    with pytest.raises(InvalidRequest, match="context of 24 positions"):
        engine.submit_continue(session, "o", 24, handoff_rows(family, tokens + [5], 0)[-1:])
    with pytest.raises(InvalidRequest, match="1..23 tokens"):
        engine.submit_generate("o", tokens, 4, None, ())
    generation = engine.submit_generate("o", tokens[:20], 10, None, ())
    run(engine)
    assert len(generation.result) == 4  # stops where the context ends


def test_a_failed_forward_answers_its_requests_and_the_engine_goes_on(family, monkeypatch):
    engine = Engine(family, limits=EngineLimits(max_sessions=2))
    tokens = prompt_of(6, seed=81)
    h = handoff_rows(family, tokens, 0)
    session, _ = engine.open_session("o", 0)
    work = engine.submit_continue(session, "o", 0, h)
    generation = engine.submit_generate("o", tokens, 3, None, ())

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    with monkeypatch.context() as patch:
        patch.setattr(engine.model, "run_blocks", broken)
        assert engine.step() == 12
    assert "device lost" in str(work.error) and "device lost" in str(generation.error)
    assert not engine.has_work() and engine.stats()["free_slots"] == 1
    got = answer(engine, session, "o", 0, h, return_all=True)  # the frontier never moved
    assert_argmax(family.logits(tokens, exit=LAST)[0], got.tokens)


def test_an_edge_engine_answers_with_its_exit_and_hands_on_its_rows():
    """to_exit=1: blocks after exit 0 up to exit 1's layer, exit 1's branch, and h_e1 out."""
    import numpy as np

    from builders import sharpen_heads, tiny_config
    from cloud.engine import Engine
    from flow import Family

    family = sharpen_heads(Family.random(tiny_config(head_dim=16, max_seq_len=48), seed=5))
    engine = Engine(family, to_exit=1)
    prompts = [[3, 14, 15, 92, 65], [35, 89], [7, 9, 3, 2, 38, 46, 26]]
    sessions = [engine.open_session("a", 0)[0] for _ in prompts]
    for step in range(4):  # a catch-up chunk, then single rows, all sessions in one step
        works = []
        for session, prompt in zip(sessions, prompts, strict=True):
            rows = family.handoff(prompt, exit=0)[0].numpy()
            start = 0 if step == 0 else len(prompt) - 1
            works.append(engine.submit_continue(session, "a", start, rows[start:], return_all=True))
        assert engine.step() == sum(len(p) if step == 0 else 1 for p in prompts)
        for work, prompt in zip(works, prompts, strict=True):
            answer = work.result
            count = len(prompt) if step == 0 else 1
            logits = family.logits(prompt, exit=1)[0, -count:]
            assert answer.tokens == logits.argmax(-1).tolist()
            np.testing.assert_allclose(answer.handoff, family.handoff(prompt, exit=1)[0, -count:].numpy(),
                                       atol=1e-5)
            probs = logits.softmax(-1).max(-1).values.numpy()
            np.testing.assert_allclose(answer.scores, probs, atol=1e-5)
            prompt.append(answer.tokens[-1])
    with pytest.raises(InvalidRequest, match="not before it"):
        engine.open_session("a", 1)
