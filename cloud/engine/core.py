"""The engine: many sessions' continuations through the deeper blocks, batched.

A plain steppable object, with no sockets, threads or asyncio: callers submit work and call
`step()`; an engine client (`cloud.engine.in_process`, or `cloud.engine.worker` in a process of
its own) drives it from one thread, and the gRPC front end sits before that. The engine is NOT
thread-safe: its caller serialises every call (one thread, or a lock). Request errors are raised
synchronously by the `submit_*` calls; a `Work` only ever finishes with an error when it is
cancelled, its session is closed, or the forward pass itself failed.

Batching
    `step()` asks the scheduler (`cloud.engine.scheduler`) for this step's chunks, groups them by
    the block they start at (after exit k: block `exits[k]+1`; generate: the embedding, then
    block 0) and by length (`forwards`: a long prompt does not pad every decode row to its
    length), and runs each group as ONE forward of shape `(chunks, longest chunk, hidden)`
    through its blocks with per-token positions. Each layer's cache in that forward is the KV
    pool (`cloud.engine.kv_pool`) seen through the batch's slots: the new keys and values are
    scattered to (slot, position), then each row's slot is gathered (up to the furthest position
    in the batch) for attention under the mask "a query at p sees keys at positions <= p", which
    also hides whatever a rolled-back draft or a slot's previous owner left past the frontier.
    Only the rows an answer needs go through the final norm and LM head.

Padding and the scratch slot
    Chunks shorter than their group's longest are right-padded. A padding token takes the
    position of its row's last real token (so its rotary angles and mask are a real query's and
    it always has keys to attend: no NaNs), and its keys and values are written to the pool's
    `scratch` slot, which no session owns and no query ever gathers. Padding therefore never
    touches a session's cache; its outputs are discarded.

Exactness
    The arithmetic is the reference model's (`flow.model`), so the tokens are the full model's
    greedy tokens up to the float noise of batching (near ties aside, DESIGN.md §4).
    `flow.reference_tier.ReferenceTier` is the unbatched, one-session-at-a-time statement of the
    same semantics.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cloud.engine.config import EngineConfig, EngineLimits
from cloud.engine.kv_pool import KVPool
from cloud.engine.requests import Chunk, ContinueJob, GenerateJob, Session, Work
from cloud.engine.scheduler import Scheduler, SingleRowsFirst, forwards
from cloud.engine.stages import StageTimes
from flow.confidence import DEFAULT_POLICY, ExitPolicy
from flow.errors import ConfigError
from flow.sampling import Sampler
from flow.tier import (
    Answer,
    Exhausted,
    InvalidRequest,
    SamplingParams,
    SessionLost,
    TierError,
    TopK,
    check_start,
    first_block_after,
    integer,
    rolled_back,
)

log = logging.getLogger("flow.cloud.engine")


class Engine:
    """Batched continuations of many sessions after any exit, and whole-model generation.

    `first_layer` (default 0) is the first backbone block this engine holds KV memory for:
    sessions may continue after any exit whose next block is at or beyond it, and whole-model
    generate needs it to be 0. `clock` is injectable for tests of the TTL; `scheduler` chooses
    each step's work (default `SingleRowsFirst`).
    """

    def __init__(self, family, first_layer: int | None = None, limits: EngineLimits | None = None,
                 clock: Callable[[], float] = time.monotonic, to_exit: int | None = None,
                 policy: str = DEFAULT_POLICY, scheduler: Scheduler | None = None):
        config = family.config
        self.family, self.model, self.config = family, family.model, config
        self.limits = limits or EngineLimits()
        self.first_layer = 0 if first_layer is None else first_layer
        if not 0 <= self.first_layer < config.num_layers:
            raise ConfigError(f"first_layer must be in 0..{config.num_layers - 1}, got {first_layer}")
        param = family.model.embed.weight
        self.device, self.dtype = param.device, param.dtype
        # An edge engine stops at `to_exit` and answers with that exit (plus the hand-off rows
        # after its block, for the next tier); the cloud's engine runs to the full model.
        self.last_exit = config.last_exit if to_exit is None else config.check_exit(to_exit)
        self.last_layer = config.exits[self.last_exit]
        self.is_edge = self.last_exit != config.last_exit
        if self.is_edge and self.last_layer < self.first_layer:
            raise ConfigError(f"to_exit {to_exit} sits before block {self.first_layer}")
        self.exit_policy = ExitPolicy(policy)  # an edge's scores; the front end applies the threshold
        self.scheduler = scheduler or SingleRowsFirst()
        # the answering exit's own block (an edge's exit branch) has a cache of its own
        self.pool = KVPool(config, range(self.first_layer, self.last_layer + 1),
                           self.model.exits[self.last_exit].block is not None, self.limits,
                           self.device, self.dtype, clock)
        self.context = self.pool.context  # positions per session
        self._pending: dict[str, Session] = {}  # sessions with a job, in arrival order
        self._counts = dict(steps=0, rows=0, forwards=0, padding_rows=0)
        self._stages = StageTimes(torch.cuda.synchronize if self.device.type == "cuda" else None)
        self._last_batch: dict[str, Any] = dict(rows=0, chunks=[])

    @classmethod
    def from_config(cls, family, config: EngineConfig) -> Engine:
        """The engine of a tier's `EngineConfig` (what every engine client builds)."""
        return cls(family, limits=config.limits, to_exit=config.to_exit, policy=config.policy)

    # ---- sessions ---------------------------------------------------------------------------

    def open_session(self, owner: str, from_exit: int) -> tuple[str, int]:
        """A new session continuing after member `from_exit`: (session id, frontier 0)."""
        first = self._first_block_after(from_exit)
        session = self.pool.open(owner, first, generating=False)
        return session.id, session.frontier

    def rollback(self, session_id: str, owner: str, position: int) -> int:
        """Discard positions >= `position` (never moves forward); returns the frontier."""
        session = self._idle_session(session_id, owner)
        session.frontier = rolled_back(session.frontier, position)
        self.pool.touch(session)
        return session.frontier

    def close(self, session_id: str, owner: str) -> bool:
        """Free the session's slot; whether it was open. Idempotent, and silent about sessions
        of other owners (False: nothing was closed)."""
        session = self.pool.sessions.get(session_id) if isinstance(session_id, str) else None
        if session is None or session.owner != owner or session.generating:
            return False
        work = session.job.work if session.job is not None else None
        self._drop(session)
        if work is not None:
            self._finish(work, error=SessionLost("the session was closed before this request ran"))
        return True

    def expire_idle(self) -> int:
        """Drop the sessions idle for longer than the TTL; returns how many."""
        return self.pool.expire_idle()

    def ended_sessions(self) -> list[str]:
        """The ids of the sessions this engine ended on its own (evicted or expired) since the
        last call, for whoever keeps per-session state beside it."""
        return self.pool.take_ended()

    # ---- submitting work --------------------------------------------------------------------

    def submit_continue(self, session_id: str, owner: str, start: int, rows: np.ndarray,
                        return_all: bool = False, top_k: int = 0, rollback: bool = False,
                        on_done: Callable[[Work], None] | None = None) -> Work:
        """Queue hand-off rows (n, hidden) for positions start.. of a session.

        Everything is validated here, synchronously. `rollback=True` first discards the session's
        positions >= start; otherwise start must be the frontier. On completion the frontier is
        start + n and `result` is a `Answer`.
        """
        session = self._idle_session(session_id, owner)
        hidden = self._check_rows(rows)
        start = check_start(session.frontier, start, len(hidden), rollback, self.context)
        top_k = integer(top_k, "top_k")
        if not 0 <= top_k <= self.limits.max_top_k:
            raise InvalidRequest(f"top_k must be in 0..{self.limits.max_top_k} (0 = no top-k; this "
                                 f"tier's --max-top-k), got {top_k}")
        session.frontier = start  # a no-op unless rolling back
        work = Work("continue", session.id, on_done=on_done)
        self._enqueue(session, ContinueJob(work, hidden, start, bool(return_all),
                                           min(top_k, self.config.vocab_size)))
        return work

    def submit_generate(self, owner: str, token_ids: list[int], max_new_tokens: int,
                        sampling: SamplingParams | None = None, stop_ids: Iterable[int] = (),
                        on_token: Callable[[int], None] | None = None,
                        on_done: Callable[[Work], None] | None = None) -> Work:
        """Queue a whole-model generation; `result` is the list of new tokens.

        It stops after `max_new_tokens`, after a token in `stop_ids` (which is kept), or at the
        end of the context. Its slot is held until then.
        """
        if self.first_layer != 0 or self.is_edge:
            raise InvalidRequest(f"this engine holds blocks {self.first_layer}..{self.last_layer} "
                                 f"only; whole-model generate needs every block")
        tokens = self._check_token_ids(token_ids)
        max_new_tokens = integer(max_new_tokens, "max_new_tokens")
        if max_new_tokens < 1:
            raise InvalidRequest(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        try:
            sampler = Sampler(sampling)
        except ConfigError as err:
            raise InvalidRequest(str(err)) from None
        stops = frozenset(integer(t, "stop id") for t in stop_ids)
        session = self.pool.open(owner, 0, generating=True)  # last: it may evict
        work = Work("generate", session.id, on_done=on_done, on_token=on_token)
        self._enqueue(session, GenerateJob(work, tokens, max_new_tokens, sampler, stops))
        return work

    def cancel(self, work: Work) -> None:
        """Drop queued work (its caller went away); a generation also frees its slot."""
        if work.done:
            return
        session = self.pool.sessions.get(work.session_id)
        if session is not None and session.job is not None and session.job.work is work:
            self._release(session)
        self._finish(work, error=TierError("the request was cancelled"))

    # ---- running ----------------------------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self._pending)

    @torch.no_grad()
    def step(self) -> int:
        """Run one batch of everyone's pending work; returns the real rows processed."""
        self._stages.start()
        chunks = self.scheduler.schedule(list(self._pending.values()), self.limits.max_batch_rows)
        groups = list(forwards(chunks))
        self._stages.lap("schedule")
        for first, generating, group in groups:
            try:
                self._run_group(first, generating, group)
            except Exception as err:  # noqa: BLE001 - a failed forward answers its requests, not the engine
                self._stages.lap_failed()
                log.exception("forward from block %d failed for %d requests", first, len(group))
                for chunk in group:
                    self._fail(chunk.session, TierError(f"the engine failed on this request: {err}"))
        rows = sum(chunk.length for chunk in chunks)
        if chunks:
            self._counts["steps"] += 1
            self._counts["rows"] += rows
            self._counts["forwards"] += len(groups)
            self._counts["padding_rows"] += sum(
                len(group) * max(c.length for c in group) for _, _, group in groups) - rows
            self._last_batch = dict(rows=rows, chunks=[
                dict(first_block=c.session.first_layer, rows=c.length,
                     kind="generate" if c.session.generating else "continue") for c in chunks])
        return rows

    def stats(self) -> dict:
        generations = sum(s.generating for s in self.pool.sessions.values())
        pool = self.pool.stats()
        return dict(
            sessions=len(self.pool.sessions) - generations, generations=generations,
            slots=pool["slots"], free_slots=pool["free_slots"], queued_work=len(self._pending),
            kv_bytes_in_use=pool["kv_bytes_in_use"], kv_bytes_total=pool["kv_bytes_total"],
            evictions=self.pool.evictions, expired=self.pool.expired, **self._counts,
            last_batch_rows=self._last_batch["rows"], last_batch=dict(self._last_batch),
            stage_seconds=self._stages.snapshot())

    # ---- the batched forward ----------------------------------------------------------------

    def _run_group(self, first: int, generating: bool, group: list[Chunk]) -> None:
        """One forward of the group's chunks through blocks first..last_layer, then answers."""
        # In slot order: when the rows hold a run of consecutive slots (every session of a full
        # decode batch, or a single row), attention reads the pool in place instead of a copy.
        group.sort(key=lambda c: c.session.slot)
        width = max(c.length for c in group)
        positions, token_slots = self._positions(group, width)
        slots = [c.session.slot for c in group]
        row_slots = torch.tensor(slots, device=self.device)
        consecutive = slots[-1] - slots[0] == len(slots) - 1  # distinct slots, sorted
        span = max(c.position + c.length for c in group)  # keys any real query may attend
        mask = (torch.arange(span, device=self.device) <= positions[..., None])[:, None]
        cache = self.pool.cache(first, self.last_layer, self.last_exit, token_slots, row_slots, span,
                                first_slot=slots[0] if consecutive else None)
        hidden = self._token_inputs(group, width) if generating else self._row_inputs(group, width)
        self._stages.lap("inputs")
        out = self.model.run_blocks(hidden, first, self.last_layer, positions, cache, mask)
        self._stages.lap("blocks")
        if self.pool.exit_block is not None:
            # an exit block attends over every row, so the whole batch goes through the branch
            full = self.model.run_exit(out, self.last_exit, positions, cache, mask).float()
            answers = [full[b, list(chunk.answer_rows)] for b, chunk in enumerate(group)]
        else:
            answers = self._answer_logits(out, group)
        self._stages.lap("head")
        for b, (chunk, logits) in enumerate(zip(group, answers, strict=True)):
            if self.is_edge:  # the next tier continues from these rows
                chunk.job.handoff.append(out[b, :chunk.length].float().cpu().numpy())
            self._advance(chunk, logits)
        self._stages.lap("answers")

    def _positions(self, group: list[Chunk], width: int) -> tuple[Tensor, Tensor]:
        """Per-token positions and slots (B, width); padding repeats the row's last position and
        goes to the scratch slot."""
        positions = np.empty((len(group), width), dtype=np.int64)
        slots = np.full((len(group), width), self.pool.scratch, dtype=np.int64)
        for b, chunk in enumerate(group):
            positions[b, :chunk.length] = np.arange(chunk.position, chunk.position + chunk.length)
            positions[b, chunk.length:] = chunk.position + chunk.length - 1
            slots[b, :chunk.length] = chunk.session.slot
        return (torch.from_numpy(positions).to(self.device), torch.from_numpy(slots).to(self.device))

    def _row_inputs(self, group: list[Chunk], width: int) -> Tensor:
        hidden = torch.zeros((len(group), width, self.config.hidden_size), dtype=self.dtype,
                             device=self.device)
        for b, chunk in enumerate(group):
            job = chunk.job
            hidden[b, :chunk.length] = job.hidden[job.done_rows:job.done_rows + chunk.length]
        return hidden

    def _token_inputs(self, group: list[Chunk], width: int) -> Tensor:
        ids = np.zeros((len(group), width), dtype=np.int64)
        for b, chunk in enumerate(group):
            job = chunk.job
            ids[b, :chunk.length] = job.tokens[job.cached:job.cached + chunk.length]
        return self.model.embed_tokens(torch.from_numpy(ids).to(self.device))

    def _answer_logits(self, out: Tensor, group: list[Chunk]) -> list[Tensor]:
        """Float logits (rows, vocab) per chunk, for the rows its answer needs only: the final norm
        and LM head run on those rows alone."""
        index = [(b, t) for b, chunk in enumerate(group) for t in chunk.answer_rows]
        if not index:
            return [out.new_zeros((0, self.config.vocab_size)).float() for _ in group]
        b_index, t_index = (torch.tensor(i, device=self.device) for i in zip(*index, strict=True))
        logits = self.model.run_exit(out[b_index, t_index][None], self.last_exit)[0].float()
        return list(logits.split([len(chunk.answer_rows) for chunk in group]))

    def _advance(self, chunk: Chunk, logits: Tensor) -> None:
        job = chunk.job
        if isinstance(job, ContinueJob):
            self._advance_continue(chunk.session, job, chunk, logits)
        else:
            self._advance_generate(chunk.session, job, chunk, logits)

    def _advance_continue(self, session: Session, job: ContinueJob, chunk: Chunk,
                          logits: Tensor) -> None:
        job.done_rows += chunk.length
        if len(logits):
            job.tokens += logits.argmax(-1).tolist()
            if self.is_edge:
                job.scores += self.exit_policy.scores(logits.cpu().numpy()).tolist()
            if job.top_k:
                values, ids = logits.topk(job.top_k, dim=-1)
                job.best += [TopK(i, v) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
        if chunk.final:
            session.frontier = job.start + len(job.hidden)
            answer = Answer(job.tokens, session.frontier, top_k=job.best)
            if self.is_edge:
                answer.handoff = np.concatenate(job.handoff)
                answer.scores = job.scores
            self._complete(session, answer)

    def _advance_generate(self, session: Session, job: GenerateJob, chunk: Chunk,
                          logits: Tensor) -> None:
        job.cached += chunk.length
        if not chunk.final:  # more of the prompt to feed first
            return
        token = job.sampler.pick(logits[-1].cpu().numpy())
        job.tokens.append(token)
        job.new.append(token)
        _call(job.work.on_token, token)
        if (len(job.new) >= job.max_new_tokens or token in job.stop_ids
                or len(job.tokens) >= self.context):
            self._complete(session, job.new)

    # ---- bookkeeping ------------------------------------------------------------------------

    def _drop(self, session: Session) -> None:
        self._pending.pop(session.id, None)
        session.job = None
        self.pool.drop(session)

    def _session(self, session_id: str, owner: str) -> Session:
        """The caller's live session; one that is unknown, expired or another owner's all read
        the same, so that ids of others cannot be probed."""
        session = self.pool.live(session_id)
        if session is None or session.owner != owner or session.generating:
            raise SessionLost(f"this tier has no session {str(session_id)[:32]!r} (closed, evicted, "
                              f"expired or lost in a restart); open a new session and replay from "
                              f"position 0")
        return session

    def _idle_session(self, session_id: str, owner: str) -> Session:
        session = self._session(session_id, owner)
        if session.job is not None:
            raise InvalidRequest("this session already has a continue request in progress; wait "
                                 "for its answer before sending another request on it")
        return session

    def _enqueue(self, session: Session, job: ContinueJob | GenerateJob) -> None:
        session.job = job
        self._pending[session.id] = session
        self.pool.touch(session)

    def _release(self, session: Session) -> Work:
        """End the session's job: a generation's session goes with it, a continuation's stays
        (its frontier moves only on success, so whatever a dropped job wrote lies beyond it)."""
        work = session.job.work
        if session.generating:
            self._drop(session)
        else:
            self._pending.pop(session.id, None)
            session.job = None
            self.pool.touch(session)
        return work

    def _complete(self, session: Session, result: Any) -> None:
        self._finish(self._release(session), result=result)

    def _fail(self, session: Session, error: Exception) -> None:
        if session.job is not None:
            self._finish(self._release(session), error=error)

    @staticmethod
    def _finish(work: Work, result: Any = None, error: Exception | None = None) -> None:
        work.result, work.error, work.done = result, error, True
        _call(work.on_done, work)

    # ---- validation -------------------------------------------------------------------------

    def _first_block_after(self, from_exit: int) -> int:
        first = first_block_after(self.config, from_exit)
        if first > self.last_layer:
            raise InvalidRequest(f"this tier answers at exit {self.last_exit} (after block "
                                 f"{self.last_layer}); exit {from_exit} is not before it")
        if first < self.first_layer:
            raise InvalidRequest(f"this engine serves blocks {self.first_layer}.. only; exit "
                                 f"{from_exit} needs block {first} too")
        return first

    def _check_rows(self, rows: np.ndarray) -> Tensor:
        hidden_size, most = self.config.hidden_size, self.limits.max_rows_per_request
        if not isinstance(rows, np.ndarray) or rows.dtype != np.float32 or rows.ndim != 2:
            got = (f"{rows.dtype} array of shape {rows.shape}" if isinstance(rows, np.ndarray)
                   else type(rows).__name__)
            raise InvalidRequest(f"hand-off rows must be a float32 array (rows, {hidden_size}), "
                                 f"got {got}")
        if rows.shape[1] != hidden_size:
            raise InvalidRequest(f"hand-off rows must have this family's hidden size {hidden_size}, "
                                 f"got {rows.shape[1]}")
        if len(rows) > most:  # an empty request is check_start's to refuse
            raise Exhausted(f"{len(rows)} rows exceed the limit of {most} per request; send "
                            f"them in several requests")
        # A copy: the caller may reuse its buffer while the work waits.
        hidden = torch.tensor(rows).to(device=self.device, dtype=self.dtype)
        if not torch.isfinite(hidden).all():
            bad = int((~torch.isfinite(hidden)).any(-1).nonzero()[0])
            raise InvalidRequest(f"hand-off row {bad} holds NaN or infinite values "
                                 f"(in {str(self.dtype).removeprefix('torch.')})")
        return hidden

    def _check_token_ids(self, token_ids: list[int]) -> list[int]:
        config = self.config
        try:
            tokens = [integer(t, "token id") for t in token_ids]
        except TypeError:
            raise InvalidRequest("token_ids must be a list of integers") from None
        if not tokens or len(tokens) >= self.context:
            raise InvalidRequest(f"a generate prompt needs 1..{self.context - 1} tokens (this "
                                 f"tier's context is {self.context}), got {len(tokens)}")
        bad = [t for t in tokens if not 0 <= t < config.vocab_size]
        if bad:
            raise InvalidRequest(f"token ids must lie in 0..{config.vocab_size - 1}, got {bad[:5]}")
        return tokens


def _call(callback: Callable | None, argument: Any) -> None:
    """Run a caller's callback; its failure is the caller's bug and must not stop the engine."""
    if callback is None:
        return
    try:
        callback(argument)
    except Exception:  # noqa: BLE001
        log.exception("a work callback failed")
