"""An in-process next tier running the reference model: the stand-in for the cloud service.

`ReferenceTier(family)` implements `flow.tier.NextTier` with `flow`'s own model on the blocks after
the device's exit, one KV cache per session, the same frontier rules and the same codecs as the
wire. Tests use it as the cloud the device SDK talks to, and `flow generate --cloud local` runs
against it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from flow.codecs import CODECS, decode, encode
from flow.errors import HashMismatchError
from flow.sampling import Sampler
from flow.tier import (
    Answer,
    InvalidRequest,
    SamplingParams,
    SessionLost,
    TopK,
    check_start,
    first_block_after,
    rolled_back,
)


@dataclass
class _Session:
    first_layer: int
    cache: object  # FamilyCache of blocks first_layer..N-1
    frontier: int = 0


class ReferenceTier:
    """The rest of `family` (a `flow.Family`) after any exit, in this process."""

    def __init__(self, family, name: str = "cloud"):
        self.family = family
        self.family_hash = family.family_hash()
        self.name = name
        self._sessions: dict[str, _Session] = {}
        self._ids = itertools.count()

    # ---- NextTier ---------------------------------------------------------------------------

    def open(self, family_hash: str, from_exit: int, codec: str = "fp32") -> ReferenceSession:
        config = self.family.config
        if family_hash != self.family_hash:
            raise HashMismatchError(f"the {self.name} tier serves family {self.family_hash[:16]}…, "
                                    f"not {family_hash[:16]}…; deploy the same family on both tiers")
        first = first_block_after(config, from_exit)
        if codec not in CODECS:
            raise InvalidRequest(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
        cache = self.family.model.new_cache(1, layers=range(first, config.num_layers), exits=[])
        session_id = f"s{next(self._ids)}"
        self._sessions[session_id] = _Session(first, cache)
        return ReferenceSession(self, session_id, codec)

    def generate(self, token_ids: list[int], max_new_tokens: int,
                 sampling: SamplingParams | None = None, stop_ids: tuple[int, ...] = (),
                 family_hash: str = "") -> Iterator[int]:
        import torch

        if family_hash and family_hash != self.family_hash:
            raise HashMismatchError(f"the {self.name} tier serves family {self.family_hash[:16]}…, "
                                    f"not {family_hash[:16]}…")
        family, sampler = self.family, Sampler(sampling)
        cache = family.model.new_cache(1, exits=[family.config.last_exit])
        tokens, start = list(token_ids), 0
        last_exit = family.config.last_exit
        with torch.no_grad():
            for _ in range(max_new_tokens):
                if len(tokens) >= family.config.max_seq_len:
                    return
                new = torch.tensor([tokens[start:]])
                positions = torch.arange(start, len(tokens))
                logits = family.model(new, positions, exits=[last_exit], cache=cache)[0]
                start = len(tokens)
                token = sampler.pick(logits[0, -1].float().numpy())
                tokens.append(token)
                yield token
                if token in stop_ids:
                    return

    # ---- what sessions call -----------------------------------------------------------------

    def _session(self, session_id: str) -> _Session:
        if session_id not in self._sessions:
            raise SessionLost(f"the {self.name} tier has no session {session_id} (restarted or "
                              f"evicted); open a new session and replay from position 0")
        return self._sessions[session_id]

    def _continue(self, session_id: str, start: int, rows: np.ndarray, codec: str,
                  return_all: bool, top_k: int, rollback: bool) -> Answer:
        import torch

        session = self._session(session_id)
        config = self.family.config
        start = check_start(session.frontier, start, len(rows), rollback, config.max_seq_len)
        payload = encode(rows, codec)  # what would travel: count it, and apply the codec's loss
        hidden = torch.from_numpy(decode(payload)).to(self.family.dtype)[None]
        positions = torch.arange(start, start + len(rows))
        model = self.family.model
        with torch.no_grad():
            out = model.run_blocks(hidden, session.first_layer, config.num_layers - 1, positions,
                                   session.cache)
            logits = model.run_exit(out, config.last_exit, positions, session.cache)[0].float()
        session.frontier = start + len(rows)
        if not return_all:
            logits = logits[-1:]
        tokens = logits.argmax(-1).tolist()
        best = []
        if top_k:
            values, ids = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
            best = [TopK(i.tolist(), v.tolist()) for i, v in zip(ids, values, strict=True)]
        received = 4 * len(tokens) + 8 * top_k * len(tokens)
        return Answer(tokens, session.frontier, self.name, best, payload.num_bytes, received)


class ReferenceSession:
    """A `flow.tier.TierSession` on a `ReferenceTier`."""

    max_rows = 0  # no limit

    def __init__(self, tier: ReferenceTier, session_id: str, codec: str):
        self.tier, self.session_id, self.codec = tier, session_id, codec

    @property
    def frontier(self) -> int:
        return self.tier._session(self.session_id).frontier

    def continue_(self, start: int, rows: np.ndarray, return_all: bool = False, top_k: int = 0,
                  rollback: bool = False) -> Answer:
        return self.tier._continue(self.session_id, start, rows, self.codec, return_all, top_k,
                                   rollback)

    def rollback(self, position: int) -> int:
        session = self.tier._session(self.session_id)
        session.frontier = rolled_back(session.frontier, position)
        return session.frontier

    def close(self) -> None:
        self.tier._sessions.pop(self.session_id, None)
