"""A test double at the tier seam: any `flow.tier.NextTier`, with faults the tests switch on.

`FaultyTier(tier)` passes every call through to `tier` (the in-process `ReferenceTier` or a real
`GrpcTier`), except:

- `reachable = False`: every call raises `TierUnavailable` without reaching the tier (a link
  down, a tier stopped);
- `refuse_with(error)`: the next call raises `error` instead (e.g. `Exhausted`, a tier at
  capacity);
- `drop_sessions()`: closes every session opened through it on the real tier, so their next
  request is refused with `SessionLost`, as after a restart;
- `lose_next_answer()`: the next `continue_` reaches the tier, which runs it, but its answer is
  lost on the way back (`TierUnavailable`), as when a link drops between the reply and the device;
- `delay_s`: every call takes that much longer (a link's round trip).
"""

from __future__ import annotations

import time

from flow.tier import TierUnavailable


class FaultyTier:
    def __init__(self, tier):
        self.tier, self.name = tier, tier.name
        self.reachable = True
        self.delay_s = 0.0
        self._refusal: Exception | None = None
        self._lose = False
        self._sessions: list[FaultySession] = []

    def refuse_with(self, error: Exception) -> None:
        self._refusal = error

    def lose_next_answer(self) -> None:
        self._lose = True

    def drop_sessions(self) -> None:
        for session in self._sessions:
            session.session.close()
        self._sessions.clear()

    def check(self) -> None:
        """Raise the fault switched on for this call, if any (after the link's delay)."""
        time.sleep(self.delay_s)
        if not self.reachable:
            raise TierUnavailable(f"{self.name} tier is unreachable")
        refusal, self._refusal = self._refusal, None
        if refusal is not None:
            raise refusal

    def open(self, *args, **kwargs) -> FaultySession:
        self.check()
        session = FaultySession(self, self.tier.open(*args, **kwargs))
        self._sessions.append(session)
        return session

    def generate(self, *args, **kwargs):
        self.check()
        yield from self.tier.generate(*args, **kwargs)


class FaultySession:
    def __init__(self, tier: FaultyTier, session):
        self.tier, self.session = tier, session
        self.session_id, self.max_rows = session.session_id, session.max_rows

    @property
    def frontier(self) -> int:
        return self.session.frontier

    def continue_(self, *args, **kwargs):
        self.tier.check()
        answer = self.session.continue_(*args, **kwargs)
        if self.tier._lose:
            self.tier._lose = False
            raise TierUnavailable("the answer was lost on its way back")
        return answer

    def rollback(self, position: int) -> int:
        self.tier.check()
        return self.session.rollback(position)

    def close(self) -> None:
        self.tier.check()
        self.session.close()
