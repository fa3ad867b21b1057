"""The KV slot pool: every session's keys and values, allocated once, and who holds which slot.

A session continues after one exit k: it holds the keys and values of blocks
`exits[k]+1 .. N-1` for its positions `0 .. frontier-1` (DESIGN.md §4). They live in a pool
allocated once at start: per backbone layer, one pair of tensors
`(max_sessions + 1, kv_heads, context, head_dim)` in the family's dtype. A session owns one slot
(index on the first axis) for its lifetime, and its position p is column p of that slot (the
static layout of `flow.model.KVCache`), so rolling back only moves the frontier and memory is
fixed and known up front (`stats()`). A whole-model generation owns a slot while it runs.

Admission is a slot count: opening a session when every slot is held evicts the least recently
used *idle* session (one with no queued work; its next request gets `SessionLost` and the device
replays from position 0, DESIGN.md §4), or refuses with `Exhausted` when every holder is busy.
An identity at its cap (`max_sessions_per_identity`) makes room from its own sessions the same
way, so one caller cannot hold every slot. Sessions idle longer than the TTL are dropped. The ids
of sessions the pool ended on its own (evicted or expired) are kept for `take_ended`, so that
whoever keeps state per session beside the engine (an edge, a worker placement table) drops it.

The pool's one extra slot, `scratch`, belongs to no session: batch padding writes its keys and
values there, and no query ever gathers it.
"""

from __future__ import annotations

import itertools
import secrets
from collections import deque
from collections.abc import Callable

import torch
from torch import Tensor

from cloud.engine.config import EngineLimits
from cloud.engine.requests import Session
from flow.model import FamilyCache
from flow.tier import Exhausted


class KVPool:
    """Slots of keys and values for `layers` (and the answering exit's own block, if it has one),
    and the sessions holding them.

    The pool knows sessions only as slot holders: whether one is idle (`job is None`) and when
    it was last used. `clock` gives the time for the TTL.
    """

    def __init__(self, config, layers: range, exit_block: bool, limits: EngineLimits,
                 device: torch.device, dtype: torch.dtype, clock: Callable[[], float]):
        self.limits, self.clock = limits, clock
        self.scratch = limits.max_sessions  # the extra slot padding writes to
        self.context = min(limits.max_context, config.max_seq_len)  # positions per session
        shape = (limits.max_sessions + 1, config.num_kv_heads, self.context, config.head_dim)
        new_pair = lambda: (torch.zeros(shape, dtype=dtype, device=device),  # noqa: E731
                            torch.zeros(shape, dtype=dtype, device=device))
        self.blocks = {layer: new_pair() for layer in layers}
        self.exit_block = new_pair() if exit_block else None  # an edge's exit branch block
        self.slot_bytes = sum(2 * key[0].nbytes for key, _ in
                              [*self.blocks.values(), *([self.exit_block] if exit_block else [])])
        self.sessions: dict[str, Session] = {}
        self._free = list(range(limits.max_sessions))[::-1]  # pop() hands out slot 0 first
        self._recency = itertools.count()
        self.evictions = self.expired = 0
        # Read after every open and every expiry pass, which end at most max_sessions + 1
        # sessions between them: twice that never drops an id unread.
        self._ended: deque[str] = deque(maxlen=2 * limits.max_sessions + 2)

    # ---- slot holders ---------------------------------------------------------------------------

    def open(self, owner: str, first_layer: int, generating: bool) -> Session:
        """A new session holding a slot: a free one, or the least recently used idle session's
        (the owner's own when it is at its cap)."""
        session = Session(secrets.token_urlsafe(16), owner, self._take_slot(owner), first_layer,
                          generating)
        self.sessions[session.id] = session
        self.touch(session)
        return session

    def _take_slot(self, owner: str) -> int:
        cap = self.limits.max_sessions_per_identity
        if cap and sum(s.owner == owner for s in self.sessions.values()) >= cap:
            self._evict([s for s in self.sessions.values() if s.owner == owner],
                        f"this identity holds its {cap} sessions (--max-sessions-per-identity) "
                        f"and each has a request in progress; wait for one, or close one")
        elif not self._free:
            self._evict(list(self.sessions.values()),
                        f"all {self.limits.max_sessions} KV slots are held by requests in "
                        f"progress; retry shortly, or serve with more --max-sessions")
        return self._free.pop()

    def _evict(self, candidates: list[Session], refusal: str) -> None:
        """Free the slot of the least recently used idle one of `candidates`; `Exhausted` with
        `refusal` when every one is busy."""
        idle = [s for s in candidates if s.job is None]
        if not idle:
            raise Exhausted(refusal)
        evicted = min(idle, key=lambda s: s.recency)
        self.drop(evicted)
        self._ended.append(evicted.id)
        self.evictions += 1

    def drop(self, session: Session) -> None:
        """Give the session's slot back."""
        # The slot's old keys need no clearing: a new owner writes every position before any
        # of its queries may attend it.
        del self.sessions[session.id]
        self._free.append(session.slot)

    def touch(self, session: Session) -> None:
        session.last_used = self.clock()
        session.recency = next(self._recency)

    def live(self, session_id: str) -> Session | None:
        """The session of this id, unless unknown or expired (an expired one is dropped now)."""
        session = self.sessions.get(session_id) if isinstance(session_id, str) else None
        if session is not None and self._is_expired(session, self.clock()):
            self.drop(session)
            self._ended.append(session.id)
            self.expired += 1
            return None
        return session

    def expire_idle(self) -> int:
        """Drop the sessions idle for longer than the TTL; returns how many."""
        now = self.clock()
        stale = [s for s in self.sessions.values() if self._is_expired(s, now)]
        for session in stale:
            self.drop(session)
            self._ended.append(session.id)
        self.expired += len(stale)
        return len(stale)

    def take_ended(self) -> list[str]:
        """The ids of the sessions evicted or expired since the last call (closed ones are not:
        their closer knows)."""
        ended = list(self._ended)
        self._ended.clear()
        return ended

    def _is_expired(self, session: Session, now: float) -> bool:
        return session.job is None and now - session.last_used > self.limits.session_ttl_s

    # ---- the caches of one batched forward ------------------------------------------------------

    def cache(self, first: int, last: int, exit_index: int, token_slots: Tensor, row_slots: Tensor,
              span: int, first_slot: int | None = None) -> FamilyCache:
        """Blocks first..last (and the exit's block) seen through one batch's slots: each token's
        key and value go to `token_slots` (B, T) at its position, and attention reads each row's
        slot `row_slots` (B,) up to `span` positions. `first_slot`: the rows' slots are
        first_slot, first_slot + 1, ...: attention reads them in place, without a gather."""
        view = lambda pair: _PoolView(*pair, token_slots, row_slots, span, first_slot)  # noqa: E731
        exits = {exit_index: view(self.exit_block)} if self.exit_block is not None else {}
        return FamilyCache(blocks={layer: view(self.blocks[layer]) for layer in range(first, last + 1)},
                           exits=exits)

    # ---- accounting -----------------------------------------------------------------------------

    def stats(self) -> dict:
        held = self.limits.max_sessions - len(self._free)
        return dict(slots=self.limits.max_sessions, free_slots=len(self._free),
                    kv_bytes_in_use=held * self.slot_bytes,
                    kv_bytes_total=(self.limits.max_sessions + 1) * self.slot_bytes)  # with scratch


class _PoolView:
    """One layer's cache for one batched forward: the pool, seen through the batch's slots.

    Duck-types `flow.model.KVCache`: `update` writes each token's key and value at (its slot,
    its position) and returns every row's slot up to `span` positions for attention.
    """

    def __init__(self, key: Tensor, value: Tensor, token_slots: Tensor, row_slots: Tensor,
                 span: int, first_slot: int | None = None):
        self.key, self.value = key, value  # (slots + 1, kv_heads, context, head_dim)
        self.token_slots, self.row_slots, self.span = token_slots, row_slots, span
        self.first_slot = first_slot  # the rows' slots are consecutive from here (None: not)

    @property
    def max_seq_len(self) -> int:
        return self.span

    def update(self, positions: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        # Advanced indices around a slice put (B, T) first: targets are (B, T, kv_heads, head_dim).
        self.key[self.token_slots, :, positions] = key.transpose(1, 2)
        self.value[self.token_slots, :, positions] = value.transpose(1, 2)
        if self.first_slot is not None:  # consecutive slots: a view of the pool, no copy
            rows = slice(self.first_slot, self.first_slot + len(self.row_slots))
            return self.key[rows, :, :self.span], self.value[rows, :, :self.span]
        # Slice before gathering: copy only the positions this batch can attend.
        return (self.key[:, :, :self.span].index_select(0, self.row_slots),
                self.value[:, :, :self.span].index_select(0, self.row_slots))
