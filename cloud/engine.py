"""The cloud tier's engine: many sessions' continuations through the deeper blocks, batched.

A plain steppable object, with no sockets, threads or asyncio: callers submit work and call
`step()`; `cloud.runner` drives it from one thread and the gRPC front end sits before that.
The engine is NOT thread-safe: its caller serialises every call (one thread, or a lock).
Request errors are raised synchronously by the `submit_*` calls; a `Work` only ever finishes
with an error when it is cancelled, its session is closed, or the forward pass itself failed.

Sessions and the KV pool
    A session continues after one exit k: it holds the keys and values of blocks
    `exits[k]+1 .. N-1` for its positions `0 .. frontier-1` (DESIGN.md §4). They live in a pool
    allocated once at start: per backbone layer, one pair of tensors
    `(max_sessions + 1, kv_heads, max_seq_len, head_dim)` in the family's dtype. A session owns
    one slot (index on the first axis) for its lifetime, and its position p is column p of that
    slot (the static layout of `flow.model.KVCache`), so rolling back only moves the frontier and
    memory is fixed and known up front (`stats()`). A whole-model `generate` owns a slot while it
    runs. Admission is a slot count: opening a session when every slot is held evicts the least
    recently used *idle* session (one with no queued work; its next request gets `SessionLost`
    and the device replays from position 0, DESIGN.md §4), or refuses with `Exhausted` when every
    holder is busy. Sessions idle longer than the TTL are dropped.

Batching
    `step()` takes the pending work of every session at once: catch-up chunks of many rows,
    single-row decode steps, speculative verifications, generate prompts and generate decode
    steps, up to `max_batch_rows` real rows. Work longer than what is left of that budget is split
    and continues next step; single-row steps are taken first so that one long prompt never delays
    everyone else's next token. The chunks are grouped by the block they start at (after exit k:
    block `exits[k]+1`; generate: the embedding, then block 0), and each group is ONE forward of
    shape `(chunks, longest chunk, hidden)` through its blocks with per-token positions. Each
    layer's cache in that forward is a `_PoolView`: it scatters the new keys and values to
    (slot, position) in the pool, then gathers each row's slot (up to the furthest position in
    the batch) for attention under the mask "a query at p sees keys at positions <= p", which
    also hides whatever a rolled-back draft or a slot's previous owner left past the frontier.
    Only the rows an answer needs go through the final norm and LM head.

Padding and the scratch slot
    Chunks shorter than their group's longest are right-padded. A padding token takes the
    position of its row's last real token (so its rotary angles and mask are a real query's and
    it always has keys to attend: no NaNs), and its keys and values are written to the pool's one
    extra slot, `scratch`, which no session owns and no query ever gathers. Padding therefore
    never touches a session's cache; its outputs are discarded.

Exactness
    The arithmetic is the reference model's (`flow.model`), so the tokens are the full model's
    greedy tokens up to the float noise of batching (near ties aside, DESIGN.md §4).
    `flow.reference_tier.ReferenceTier` is the unbatched, one-session-at-a-time statement of the
    same semantics.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flow.confidence import ExitPolicy
from flow.errors import ConfigError
from flow.model import FamilyCache
from flow.sampling import Sampler
from flow.tier import (
    Continuation,
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

@dataclass(frozen=True)
class EngineLimits:
    max_sessions: int = 64  # KV slots in the pool
    max_rows_per_request: int = 512
    max_batch_rows: int = 2048  # real rows one step() may take; the rest waits for the next step
    session_ttl_s: float = 600.0  # idle sessions older than this are dropped
    # Positions one session may hold, at most the family's context. The pool is allocated up
    # front for every slot at this length: SmolLM2 (30 layers, 3 KV heads of 64) takes 46 KB per
    # position, so its full 8192-token context in 64 slots would be 24.5 GB.
    max_context: int = 2048

    def __post_init__(self) -> None:
        for name in ("max_sessions", "max_rows_per_request", "max_batch_rows", "max_context"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not self.session_ttl_s > 0:
            raise ConfigError(f"session_ttl_s must be > 0 seconds, got {self.session_ttl_s!r}")


class Work:
    """One submitted request, finished by `Engine.step()` (or `cancel`/`close`).

    `done`, then `result` (a `Continuation`, or the list of generated tokens) or `error`.
    `on_done(work)` is called once when it finishes; for generate work `on_token(token)` is called
    for each token as it is produced, before `on_done`.
    """

    def __init__(self, kind: str, session_id: str, on_done: Callable[[Work], None] | None = None,
                 on_token: Callable[[int], None] | None = None):
        self.kind = kind  # "continue" or "generate"
        self.on_done, self.on_token = on_done, on_token
        self.done = False
        self.result: Any = None
        self.error: Exception | None = None
        self._session_id = session_id

    def __repr__(self) -> str:
        state = "error" if self.error is not None else "done" if self.done else "queued"
        return f"Work({self.kind}, {state})"


# ---- what the engine keeps --------------------------------------------------------------------


@dataclass(eq=False)
class _Continue:
    """A queued `continue`: hand-off rows for positions start .. start + n - 1."""

    work: Work
    hidden: Tensor  # (n, hidden) on the engine's device, in the family's dtype
    start: int
    return_all: bool
    top_k: int
    done_rows: int = 0  # rows already run (a request longer than a step's budget is split)
    tokens: list[int] = field(default_factory=list)
    best: list[TopK] = field(default_factory=list)
    handoff: list[np.ndarray] = field(default_factory=list)  # an edge's rows for the next tier
    scores: list[float] = field(default_factory=list)  # an edge's confidence per answered row

    @property
    def pending_rows(self) -> int:
        return len(self.hidden) - self.done_rows

    @property
    def next_position(self) -> int:
        return self.start + self.done_rows


@dataclass(eq=False)
class _Generate:
    """A whole-model generation: its tokens so far, of which `fed` have keys in the cache."""

    work: Work
    tokens: list[int]
    max_new_tokens: int
    sampler: Sampler
    stop_ids: frozenset[int]
    fed: int = 0
    new: list[int] = field(default_factory=list)

    @property
    def pending_rows(self) -> int:
        return len(self.tokens) - self.fed

    @property
    def next_position(self) -> int:
        return self.fed


@dataclass(eq=False)
class _Session:
    id: str
    owner: str
    slot: int
    first_layer: int  # the first block it runs (0 for a generation, which starts at the embedding)
    generating: bool  # a generate's private session, not reachable through the session calls
    frontier: int = 0
    job: _Continue | _Generate | None = None
    last_used: float = 0.0  # clock time, for the TTL
    recency: int = 0  # a counter, for LRU order even when the clock is coarse


@dataclass(eq=False)
class _Chunk:
    """The part of one session's job that runs in this step."""

    session: _Session
    length: int
    final: bool  # the job's last row is in this chunk

    @property
    def job(self) -> _Continue | _Generate:
        return self.session.job

    @property
    def position(self) -> int:  # of its first row
        return self.job.next_position

    @property
    def answer_rows(self) -> range:
        """Rows of this chunk whose logits an answer needs."""
        if isinstance(self.job, _Continue) and self.job.return_all:
            return range(self.length)
        return range(self.length - 1, self.length) if self.final else range(0)


class _PoolView:
    """One layer's cache for one batched forward: the pool, seen through the batch's slots.

    Duck-types `flow.model.KVCache`: `update` writes each token's key and value at (its slot,
    its position) and returns every row's slot up to `span` positions for attention.
    """

    def __init__(self, key: Tensor, value: Tensor, token_slots: Tensor, row_slots: Tensor,
                 span: int):
        self.key, self.value = key, value  # (slots + 1, kv_heads, max_seq_len, head_dim)
        self.token_slots, self.row_slots, self.span = token_slots, row_slots, span

    @property
    def max_seq_len(self) -> int:
        return self.span

    def update(self, positions: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        # Advanced indices around a slice put (B, T) first: targets are (B, T, kv_heads, head_dim).
        self.key[self.token_slots, :, positions] = key.transpose(1, 2)
        self.value[self.token_slots, :, positions] = value.transpose(1, 2)
        # Slice before gathering: copy only the positions this batch can attend.
        return (self.key[:, :, :self.span].index_select(0, self.row_slots),
                self.value[:, :, :self.span].index_select(0, self.row_slots))


# ---- the engine -------------------------------------------------------------------------------


class Engine:
    """Batched continuations of many sessions after any exit, and whole-model generation.

    `first_layer` (default 0) is the first backbone block this engine holds KV memory for:
    sessions may continue after any exit whose next block is at or beyond it, and whole-model
    generate needs it to be 0. `clock` is injectable for tests of the TTL.
    """

    def __init__(self, family, first_layer: int | None = None, limits: EngineLimits | None = None,
                 clock: Callable[[], float] = time.monotonic, to_exit: int | None = None,
                 policy: str = "max_prob"):
        config = family.config
        self.family, self.model, self.config = family, family.model, config
        self.limits = limits or EngineLimits()
        self.clock = clock
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
        self.scratch = self.limits.max_sessions  # the extra slot padding writes to
        self.context = min(self.limits.max_context, config.max_seq_len)  # positions per session
        shape = (self.limits.max_sessions + 1, config.num_kv_heads, self.context, config.head_dim)
        new_pool = lambda: (torch.zeros(shape, dtype=self.dtype, device=self.device),  # noqa: E731
                            torch.zeros(shape, dtype=self.dtype, device=self.device))
        self._pool = {layer: new_pool() for layer in range(self.first_layer, self.last_layer + 1)}
        # the answering exit's own block (an edge's exit branch) has a cache of its own
        self._exit_pool = new_pool() if self.model.exits[self.last_exit].block is not None else None
        self._slot_bytes = sum(2 * k[0].nbytes for k, _ in
                               [*self._pool.values(), *([self._exit_pool] if self._exit_pool else [])])
        self._free = list(range(self.limits.max_sessions))[::-1]  # pop() hands out slot 0 first
        self._sessions: dict[str, _Session] = {}
        self._pending: dict[str, _Session] = {}  # sessions with a job, in arrival order
        self._recency = itertools.count()
        self._counts = dict(evictions=0, expired=0, steps=0, rows=0)
        self._last_batch: dict[str, Any] = dict(rows=0, chunks=[])

    # ---- sessions ---------------------------------------------------------------------------

    def open_session(self, owner: str, from_exit: int) -> tuple[str, int]:
        """A new session continuing after member `from_exit`: (session id, frontier 0)."""
        first = self._first_block_after(from_exit)
        session = self._new_session(owner, first, generating=False)
        return session.id, session.frontier

    def rollback(self, session_id: str, owner: str, position: int) -> int:
        """Discard positions >= `position` (never moves forward); returns the frontier."""
        session = self._idle_session(session_id, owner)
        session.frontier = rolled_back(session.frontier, position)
        self._touch(session)
        return session.frontier

    def close(self, session_id: str, owner: str) -> None:
        """Free the session's slot. Idempotent, and silent about sessions of other owners."""
        session = self._sessions.get(session_id) if isinstance(session_id, str) else None
        if session is None or session.owner != owner or session.generating:
            return
        work = session.job.work if session.job is not None else None
        self._drop(session)
        if work is not None:
            self._finish(work, error=SessionLost("the session was closed before this request ran"))

    def expire_idle(self) -> int:
        """Drop the sessions idle for longer than the TTL; returns how many."""
        now = self.clock()
        stale = [s for s in self._sessions.values() if self._is_expired(s, now)]
        for session in stale:
            self._drop(session)
        self._counts["expired"] += len(stale)
        return len(stale)

    # ---- submitting work --------------------------------------------------------------------

    def submit_continue(self, session_id: str, owner: str, start: int, rows: np.ndarray,
                        return_all: bool = False, top_k: int = 0, rollback: bool = False,
                        on_done: Callable[[Work], None] | None = None) -> Work:
        """Queue hand-off rows (n, hidden) for positions start.. of a session.

        Everything is validated here, synchronously. `rollback=True` first discards the session's
        positions >= start; otherwise start must be the frontier. On completion the frontier is
        start + n and `result` is a `Continuation`.
        """
        session = self._idle_session(session_id, owner)
        hidden = self._check_rows(rows)
        start = check_start(session.frontier, start, len(hidden), rollback, self.context)
        top_k = integer(top_k, "top_k")
        if top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0 (0 = no top-k), got {top_k}")
        session.frontier = start  # a no-op unless rolling back
        work = Work("continue", session.id, on_done=on_done)
        self._enqueue(session, _Continue(work, hidden, start, bool(return_all),
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
        session = self._new_session(owner, 0, generating=True)  # last: it may evict
        work = Work("generate", session.id, on_done=on_done, on_token=on_token)
        self._enqueue(session, _Generate(work, tokens, max_new_tokens, sampler, stops))
        return work

    def cancel(self, work: Work) -> None:
        """Drop queued work (its caller went away); a generation also frees its slot."""
        if work.done:
            return
        session = self._sessions.get(work._session_id)
        if session is not None and session.job is not None and session.job.work is work:
            self._release(session)
        self._finish(work, error=TierError("the request was cancelled"))

    # ---- running ----------------------------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self._pending)

    @torch.no_grad()
    def step(self) -> int:
        """Run one batch of everyone's pending work; returns the real rows processed."""
        chunks = self._schedule()
        groups: dict[tuple[int, bool], list[_Chunk]] = {}
        for chunk in chunks:
            groups.setdefault((chunk.session.first_layer, chunk.session.generating), []).append(chunk)
        for (first, generating), group in sorted(groups.items()):
            try:
                self._run_group(first, generating, group)
            except Exception as err:  # noqa: BLE001 - a failed forward answers its requests, not the engine
                log.exception("forward from block %d failed for %d requests", first, len(group))
                for chunk in group:
                    self._fail(chunk.session, TierError(f"the engine failed on this request: {err}"))
        rows = sum(chunk.length for chunk in chunks)
        if chunks:
            self._counts["steps"] += 1
            self._counts["rows"] += rows
            self._last_batch = dict(rows=rows, chunks=[
                dict(first_block=c.session.first_layer, rows=c.length,
                     kind="generate" if c.session.generating else "continue") for c in chunks])
        return rows

    def stats(self) -> dict:
        held = self.limits.max_sessions - len(self._free)
        generations = sum(s.generating for s in self._sessions.values())
        return dict(
            sessions=len(self._sessions) - generations, generations=generations,
            slots=self.limits.max_sessions, free_slots=len(self._free), queued_work=len(self._pending),
            kv_bytes_in_use=held * self._slot_bytes,
            kv_bytes_total=(self.limits.max_sessions + 1) * self._slot_bytes,  # with the scratch slot
            **self._counts, last_batch_rows=self._last_batch["rows"],
            last_batch=dict(self._last_batch))

    # ---- scheduling and the batched forward -------------------------------------------------

    def _schedule(self) -> list[_Chunk]:
        """This step's chunks: single-row steps first, then the rest in arrival order."""
        budget = self.limits.max_batch_rows
        chunks = []
        # sorted() is stable: arrival order within each class.
        for session in sorted(self._pending.values(), key=lambda s: s.job.pending_rows > 1):
            if budget == 0:
                break
            take = min(session.job.pending_rows, budget)
            chunks.append(_Chunk(session, take, final=take == session.job.pending_rows))
            budget -= take
        return chunks

    def _run_group(self, first: int, generating: bool, group: list[_Chunk]) -> None:
        """One forward of the group's chunks through blocks first..last_layer, then answers."""
        width = max(c.length for c in group)
        positions, token_slots = self._positions(group, width)
        row_slots = torch.tensor([c.session.slot for c in group], device=self.device)
        span = max(c.position + c.length for c in group)  # keys any real query may attend
        mask = (torch.arange(span, device=self.device) <= positions[..., None])[:, None]
        view = lambda pool: _PoolView(*pool, token_slots, row_slots, span)  # noqa: E731
        cache = FamilyCache(blocks={layer: view(self._pool[layer])
                                    for layer in range(first, self.last_layer + 1)},
                            exits={self.last_exit: view(self._exit_pool)} if self._exit_pool else {})
        hidden = self._token_inputs(group, width) if generating else self._row_inputs(group, width)
        out = self.model.run_blocks(hidden, first, self.last_layer, positions, cache, mask)
        if self._exit_pool is not None:
            # an exit block attends over every row, so the whole batch goes through the branch
            full = self.model.run_exit(out, self.last_exit, positions, cache, mask).float()
            answers = [full[b, list(chunk.answer_rows)] for b, chunk in enumerate(group)]
        else:
            answers = self._answer_logits(out, group)
        for b, (chunk, logits) in enumerate(zip(group, answers, strict=True)):
            if self.is_edge:  # the next tier continues from these rows
                chunk.job.handoff.append(out[b, :chunk.length].float().cpu().numpy())
            self._advance(chunk, logits)

    def _positions(self, group: list[_Chunk], width: int) -> tuple[Tensor, Tensor]:
        """Per-token positions and slots (B, width); padding repeats the row's last position and
        goes to the scratch slot."""
        positions = np.empty((len(group), width), dtype=np.int64)
        slots = np.full((len(group), width), self.scratch, dtype=np.int64)
        for b, chunk in enumerate(group):
            positions[b, :chunk.length] = np.arange(chunk.position, chunk.position + chunk.length)
            positions[b, chunk.length:] = chunk.position + chunk.length - 1
            slots[b, :chunk.length] = chunk.session.slot
        return (torch.from_numpy(positions).to(self.device), torch.from_numpy(slots).to(self.device))

    def _row_inputs(self, group: list[_Chunk], width: int) -> Tensor:
        hidden = torch.zeros((len(group), width, self.config.hidden_size), dtype=self.dtype,
                             device=self.device)
        for b, chunk in enumerate(group):
            job = chunk.job
            hidden[b, :chunk.length] = job.hidden[job.done_rows:job.done_rows + chunk.length]
        return hidden

    def _token_inputs(self, group: list[_Chunk], width: int) -> Tensor:
        ids = np.zeros((len(group), width), dtype=np.int64)
        for b, chunk in enumerate(group):
            job = chunk.job
            ids[b, :chunk.length] = job.tokens[job.fed:job.fed + chunk.length]
        return self.model.embed_tokens(torch.from_numpy(ids).to(self.device))

    def _answer_logits(self, out: Tensor, group: list[_Chunk]) -> list[Tensor]:
        """Float logits (rows, vocab) per chunk, for the rows its answer needs only: the final norm
        and LM head run on those rows alone."""
        index = [(b, t) for b, chunk in enumerate(group) for t in chunk.answer_rows]
        if not index:
            return [out.new_zeros((0, self.config.vocab_size)).float() for _ in group]
        b_index, t_index = (torch.tensor(i, device=self.device) for i in zip(*index, strict=True))
        logits = self.model.run_exit(out[b_index, t_index][None], self.last_exit)[0].float()
        return list(logits.split([len(chunk.answer_rows) for chunk in group]))

    def _advance(self, chunk: _Chunk, logits: Tensor) -> None:
        job = chunk.job
        if isinstance(job, _Continue):
            self._advance_continue(chunk.session, job, chunk, logits)
        else:
            self._advance_generate(chunk.session, job, chunk, logits)

    def _advance_continue(self, session: _Session, job: _Continue, chunk: _Chunk,
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
            answer = Continuation(job.tokens, session.frontier, top_k=job.best)
            if self.is_edge:
                answer.handoff = np.concatenate(job.handoff)
                answer.scores = job.scores
            self._complete(session, answer)

    def _advance_generate(self, session: _Session, job: _Generate, chunk: _Chunk,
                          logits: Tensor) -> None:
        job.fed += chunk.length
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

    def _new_session(self, owner: str, first_layer: int, generating: bool) -> _Session:
        session = _Session(secrets.token_urlsafe(16), owner, self._take_slot(), first_layer,
                           generating)
        self._sessions[session.id] = session
        self._touch(session)
        return session

    def _take_slot(self) -> int:
        if not self._free:
            idle = [s for s in self._sessions.values() if s.job is None]
            if not idle:
                raise Exhausted(f"all {self.limits.max_sessions} KV slots are held by requests in "
                                f"progress; retry shortly, or serve with more --max-sessions")
            self._drop(min(idle, key=lambda s: s.recency))  # the least recently used
            self._counts["evictions"] += 1
        return self._free.pop()

    def _drop(self, session: _Session) -> None:
        # The slot's old keys need no clearing: a new owner writes every position before any
        # of its queries may attend it.
        del self._sessions[session.id]
        self._pending.pop(session.id, None)
        session.job = None
        self._free.append(session.slot)

    def _touch(self, session: _Session) -> None:
        session.last_used = self.clock()
        session.recency = next(self._recency)

    def _is_expired(self, session: _Session, now: float) -> bool:
        return session.job is None and now - session.last_used > self.limits.session_ttl_s

    def _session(self, session_id: str, owner: str) -> _Session:
        """The caller's live session; one that is unknown, expired or another owner's all read
        the same, so that ids of others cannot be probed."""
        session = self._sessions.get(session_id) if isinstance(session_id, str) else None
        if session is not None and self._is_expired(session, self.clock()):
            self._drop(session)
            self._counts["expired"] += 1
            session = None
        if session is None or session.owner != owner or session.generating:
            raise SessionLost(f"this tier has no session {str(session_id)[:32]!r} (closed, evicted, "
                              f"expired or lost in a restart); open a new session and replay from "
                              f"position 0")
        return session

    def _idle_session(self, session_id: str, owner: str) -> _Session:
        session = self._session(session_id, owner)
        if session.job is not None:
            raise InvalidRequest("this session already has a continue request in progress; wait "
                                 "for its answer before sending another request on it")
        return session

    def _enqueue(self, session: _Session, job: _Continue | _Generate) -> None:
        session.job = job
        self._pending[session.id] = session
        self._touch(session)

    def _release(self, session: _Session) -> Work:
        """End the session's job: a generation's session goes with it, a continuation's stays
        (its frontier moves only on success, so whatever a dropped job wrote lies beyond it)."""
        work = session.job.work
        if session.generating:
            self._drop(session)
        else:
            self._pending.pop(session.id, None)
            session.job = None
            self._touch(session)
        return work

    def _complete(self, session: _Session, result: Any) -> None:
        self._finish(self._release(session), result=result)

    def _fail(self, session: _Session, error: Exception) -> None:
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
        if not 1 <= len(rows) <= most:
            if len(rows) > most:
                raise Exhausted(f"{len(rows)} rows exceed the limit of {most} per request; send "
                                f"them in several requests")
            raise InvalidRequest("a continue request needs at least one hand-off row")
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
