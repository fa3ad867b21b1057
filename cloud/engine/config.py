"""What an engine is built with: its limits, and the whole config a worker process receives.

`EngineLimits` is the one home of the engine's limits and their defaults: `flow serve` builds its
engine flags from its fields (each field's metadata names the flag and its help), and an engine
worker process receives them whole from the front end, with the rest of `EngineConfig`, when it
joins. Nothing here imports torch: the CLI and the front end of worker processes read it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from flow.confidence import DEFAULT_POLICY
from flow.errors import ConfigError


@dataclass(frozen=True)
class EngineLimits:
    """How much one engine holds and takes at once; every limit is a `flow serve` flag."""

    max_sessions: int = field(default=64, metadata={
        "flag": "--max-sessions", "help": "KV cache slots"})
    max_rows_per_request: int = field(default=512, metadata={
        "flag": "--max-rows", "help": "rows per request at most"})
    max_batch_rows: int = field(default=2048, metadata={
        "flag": "--max-batch-rows",
        "help": "rows one engine step takes at most; the rest waits for the next step"})
    session_ttl_s: float = field(default=600.0, metadata={
        "flag": "--session-ttl", "help": "seconds an idle session is kept"})
    # The pool is allocated up front for every slot at this length: SmolLM2 (30 layers, 3 KV
    # heads of 64) takes 46 KB per position, so its full 8192-token context in 64 slots would be
    # 24.5 GB.
    max_context: int = field(default=2048, metadata={
        "flag": "--max-context",
        "help": "positions one session may hold, at most the family's context; the KV pool is "
                "allocated for max-sessions x max-context up front"})
    # An answer carries top_k (id, logit) pairs per row: 512 rows at top-k 256 is 1.5 MB, where
    # an unbounded top-k would let a 512 KiB request ask for the whole vocabulary per row.
    max_top_k: int = field(default=256, metadata={
        "flag": "--max-top-k", "help": "most likely tokens an answer may list per row"})
    # Every caller shares the slots: without a cap one identity (bearer token) can hold them
    # all. At its cap an identity's own least recently used idle session makes room, never
    # another identity's.
    max_sessions_per_identity: int = field(default=0, metadata={
        "flag": "--max-sessions-per-identity",
        "help": "KV slots one identity (bearer token) may hold in one engine; at the cap its own "
                "least recently used idle session is evicted for a new one; 0: no cap"})

    def __post_init__(self) -> None:
        for name in ("max_sessions", "max_rows_per_request", "max_batch_rows", "max_context",
                     "max_top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        cap = self.max_sessions_per_identity
        if isinstance(cap, bool) or not isinstance(cap, int) or not 0 <= cap <= self.max_sessions:
            raise ConfigError(f"max_sessions_per_identity must be in 0..max_sessions "
                              f"({self.max_sessions}; 0 = no cap), got {cap!r}")
        if not self.session_ttl_s > 0:
            raise ConfigError(f"session_ttl_s must be > 0 seconds, got {self.session_ttl_s!r}")


@dataclass(frozen=True)
class EngineConfig:
    """Everything an engine is built with besides its family and its host's threads.

    The front end of worker processes sends it whole to every worker that joins (`to_dict` /
    `from_dict`, in the HELLO exchange of `cloud.engine.frames`), so all workers of a tier, local
    or on other hosts, serve with the same limits and answer at the same exit.
    """

    limits: EngineLimits = field(default_factory=EngineLimits)
    # An edge engine stops at `to_exit` and scores that exit's confidence under `policy` (the
    # front end applies the threshold); None runs to the full model.
    to_exit: int | None = None
    policy: str = DEFAULT_POLICY

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EngineConfig:
        """The config `to_dict` wrote; `ConfigError` names what is missing or unknown."""
        try:
            return cls(EngineLimits(**data["limits"]), data["to_exit"], data["policy"])
        except (KeyError, TypeError) as err:
            raise ConfigError(f"not an engine config ({type(err).__name__}: {err}): {data!r}") from None
