"""The serving benchmark's requests and runners (bench/serving.py): requests of mixed lengths, due
at given moments, served by the engine (continuous batching) or by a static batch.

Every runner holds at most `slots` requests at once (the engine's KV slots, the static batch's
rows), takes the requests that have come due in arrival order, and runs on the real clock (a
request is never started before it is due). A runner returns each request's completion time and
its tokens.

- Generation, whole model from token ids:
  - engine: `Engine.submit_generate` as each request is admitted, `step()` whenever there is work;
  - static batch: whenever idle, one `transformers` generate on the requests that have arrived
    (up to `slots`), prompts left-padded to the longest, every row generating the batch's longest
    output: a static batch waits for its longest member, and what arrives meanwhile waits for the
    next call.
- Continuation, hand-off rows after exit 0 (a device's catch-up, then one row per token, each sent
  after the answer to the one before):
  - engine: a session per request, opened when admitted and closed when done;
  - static batch on the engine: the same engine serving in batches that hold their rows until
    the longest is done. A finished request's session keeps sending rows (its own, past its end)
    until the batch ends, as a padded batch computes its finished rows; every request of a batch
    completes when the batch does. Its prompts are not left-padded (the engine runs them by
    length), so this baseline computes less than a static batch would.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import numpy as np
from common import transformers_greedy
from throughput_engine import OWNER


@dataclass(frozen=True)
class Request:
    prompt: list[int]
    new_tokens: int


def draw_lengths(count: int, median: int, spread: float, seed: int) -> list[int]:
    """`count` lengths, log-normal around `median` with `spread` the standard deviation of their
    logarithm (0: every length the median), clipped to 1 .. 8 x median. The same seed gives the
    same normal draws at every spread, so a wider spread stretches the same requests."""
    normal = np.random.default_rng(seed).standard_normal(count)
    return np.clip(np.rint(median * np.exp(spread * normal)), 1, 8 * median).astype(int).tolist()


def draw_requests(vocab_size: int, count: int, prompt_median: int, tokens_median: int,
                  spread: float, seed: int) -> list[Request]:
    prompts = draw_lengths(count, prompt_median, spread, seed + 1)
    outputs = draw_lengths(count, tokens_median, spread, seed + 2)
    ids = np.random.default_rng(seed + 3)
    return [Request(ids.integers(0, vocab_size, n).tolist(), m) for n, m in zip(prompts, outputs, strict=True)]


def arrival_times(count: int, span_s: float, seed: int) -> list[float]:
    """`count` Poisson arrivals from t = 0, scaled to end at `span_s` (the first at 0)."""
    gaps = np.random.default_rng(seed + 4).exponential(1.0, count - 1)
    times = np.concatenate([[0.0], np.cumsum(gaps)])
    return (times * (span_s / times[-1] if times[-1] > 0 else 0.0)).tolist()


class _Clock:
    """Seconds since the run started, and the requests that have come due, in arrival order."""

    def __init__(self, due: list[float]):
        self.due, self.start, self.arrived = due, time.perf_counter(), 0

    def now(self) -> float:
        return time.perf_counter() - self.start

    def take_arrivals(self, waiting: deque) -> None:
        now = self.now()
        while self.arrived < len(self.due) and self.due[self.arrived] <= now:
            waiting.append(self.arrived)
            self.arrived += 1

    def wait_for_next(self) -> None:
        delay = self.due[self.arrived] - self.now()
        if delay > 0:
            time.sleep(delay)


def _continuous(engine, count: int, due: list[float], slots: int, admit,
                after_step=lambda: None) -> dict[int, float]:
    """Admit requests as they come due while fewer than `slots` run, step while there is work;
    `admit(index, done)` submits request `index` and arranges for `done()` when it completes,
    `after_step()` sends what the step's answers call for (never from inside a step)."""
    clock = _Clock(due)
    waiting: deque[int] = deque()
    done_at: dict[int, float] = {}
    admitted = 0
    while len(done_at) < count:
        clock.take_arrivals(waiting)
        while waiting and admitted - len(done_at) < slots:
            index = waiting.popleft()
            admitted += 1
            admit(index, lambda index=index: done_at.__setitem__(index, clock.now()))
        if engine.has_work():
            engine.step()
            after_step()
        elif not waiting and clock.arrived < count:
            clock.wait_for_next()
    return done_at


def _check(work) -> None:
    if work.error is not None:
        raise work.error


def generate_on_engine(engine, requests: list[Request], due: list[float], slots: int) -> dict:
    works: dict[int, object] = {}

    def admit(index: int, done) -> None:
        works[index] = engine.submit_generate(OWNER, requests[index].prompt, requests[index].new_tokens,
                                              on_done=lambda work: done())

    done_at = _continuous(engine, len(requests), due, slots, admit)
    for work in works.values():
        _check(work)
    return {"completed_s": [done_at[i] for i in range(len(requests))],
            "tokens": [works[i].result for i in range(len(requests))]}


def _batches(count: int, due: list[float], slots: int):
    """The static batcher's calls: (clock, batch) whenever idle, each batch the first `slots`
    requests that have arrived (waiting for the next arrival when none has)."""
    clock = _Clock(due)
    waiting: deque[int] = deque()
    served = 0
    while served < count:
        clock.take_arrivals(waiting)
        if not waiting:
            clock.wait_for_next()
            continue
        batch = [waiting.popleft() for _ in range(min(slots, len(waiting)))]
        yield clock, batch
        served += len(batch)


def generate_static(model, requests: list[Request], due: list[float], slots: int) -> dict:
    completed, tokens, sizes = [0.0] * len(requests), [[] for _ in requests], []
    for clock, batch in _batches(len(requests), due, slots):
        longest = max(requests[i].new_tokens for i in batch)
        out = transformers_greedy(model, [requests[i].prompt for i in batch], longest)
        finished = clock.now()
        for row, i in enumerate(batch):
            completed[i], tokens[i] = finished, out[row][:requests[i].new_tokens]
        sizes.append(len(batch))
    return {"completed_s": completed, "tokens": tokens, "batches": sizes}


class _Continuation:
    """One request's session on the engine: its catch-up, then the row after each answer. Its rows
    go past its own output (`rows` covers the longest output of any request), so that a static
    batch can keep it running after its last token."""

    def __init__(self, engine, rows: np.ndarray, request: Request):
        self.engine, self.rows, self.request = engine, rows, request
        self.session, _ = engine.open_session(OWNER, 0)
        self.answers = 0
        self.tokens: list[int] = []
        self.work = None

    @property
    def finished(self) -> bool:
        return self.answers >= self.request.new_tokens

    def submit(self) -> None:
        prompt = len(self.request.prompt)
        start = 0 if self.answers == 0 else prompt + self.answers - 1
        rows = self.rows[:prompt] if self.answers == 0 else self.rows[start:start + 1]
        self.work = self.engine.submit_continue(self.session, OWNER, start, rows)

    def take_answer(self) -> None:
        _check(self.work)
        self.answers += 1
        if len(self.tokens) < self.request.new_tokens:
            self.tokens.append(self.work.result.tokens[-1])

    def close(self) -> None:
        self.engine.close(self.session, OWNER)


def continue_on_engine(engine, rows: list[np.ndarray], requests: list[Request], due: list[float],
                       slots: int) -> dict:
    running: dict[int, tuple[_Continuation, object]] = {}
    tokens: dict[int, list[int]] = {}

    def admit(index: int, done) -> None:
        request = _Continuation(engine, rows[index], requests[index])
        request.submit()
        running[index] = (request, done)

    def after_step() -> None:
        for index, (request, done) in list(running.items()):
            if not request.work.done:
                continue
            request.take_answer()
            if request.finished:
                tokens[index] = request.tokens
                request.close()
                del running[index]
                done()
            else:
                request.submit()

    done_at = _continuous(engine, len(requests), due, slots, admit, after_step)
    return {"completed_s": [done_at[i] for i in range(len(requests))],
            "tokens": [tokens[i] for i in range(len(requests))]}


def continue_static(engine, rows: list[np.ndarray], requests: list[Request], due: list[float],
                    slots: int) -> dict:
    completed, tokens, sizes = [0.0] * len(requests), [[] for _ in requests], []
    for clock, batch in _batches(len(requests), due, slots):
        sessions = [_Continuation(engine, rows[i], requests[i]) for i in batch]
        for _ in range(max(requests[i].new_tokens for i in batch)):  # every row, to the longest
            for session in sessions:
                session.submit()
            while engine.has_work():
                engine.step()
            for session in sessions:
                session.take_answer()
        finished = clock.now()
        for session, i in zip(sessions, batch, strict=True):
            session.close()
            completed[i], tokens[i] = finished, session.tokens
        sizes.append(len(batch))
    return {"completed_s": completed, "tokens": tokens, "batches": sizes}
