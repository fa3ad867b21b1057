"""The architecture of a family: one dataclass, no torch.

A family is a decoder backbone (`architecture`: a row of `flow.architectures`) of `num_layers` blocks with exits after the blocks listed in
`exits` (0-indexed, increasing, the last one always `num_layers - 1`). Exit k is *member k*:
embedding + blocks `0..exits[k]` + exit branch k (one extra decoder block, a norm and an LM head;
the last exit's branch is the backbone's own final norm and head, with no extra block).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from flow.architectures import DEFAULT_ARCHITECTURE, Architecture, architecture
from flow.errors import ConfigError

# Upper bounds of the sizes: far above any model flow runs (SmolLM2: 30 layers, hidden 576), low
# enough that a typo or a hostile family.json fails here in one line instead of allocating.
_SIZE_LIMITS = {"vocab_size": 1 << 22, "hidden_size": 1 << 16, "intermediate_size": 1 << 18,
                "num_layers": 1024, "num_heads": 1024, "num_kv_heads": 1024, "head_dim": 1024,
                "max_seq_len": 1 << 21}


@dataclass(frozen=True)
class FamilyConfig:
    """Shapes of the backbone and where its exits sit. Saved whole into every artifact."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    exits: tuple[int, ...]
    max_seq_len: int = 2048
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    architecture: str = DEFAULT_ARCHITECTURE  # "qwen3" or "llama" (flow.architectures)

    def __post_init__(self) -> None:
        object.__setattr__(self, "exits", tuple(int(e) for e in self.exits))
        self.validate()

    # ---- validation -------------------------------------------------------------------------

    def validate(self) -> None:
        """Raise `ConfigError` naming the first inconsistency and how to fix it."""
        for name, most in _SIZE_LIMITS.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
            if value > most:
                raise ConfigError(f"{name} = {value} is beyond what any family here can hold "
                                  f"(at most {most}); check the architecture")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}) for grouped-query attention")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not self.exits:
            raise ConfigError("a family needs at least one exit; the last must be num_layers - 1")
        if list(self.exits) != sorted(set(self.exits)):
            raise ConfigError(f"exits must be strictly increasing layer indices, got {list(self.exits)}")
        if self.exits[0] < 0 or self.exits[-1] != self.num_layers - 1:
            raise ConfigError(
                f"exits {list(self.exits)} must lie in 0..{self.num_layers - 1} and end with the "
                f"backbone's last layer {self.num_layers - 1} (the full model is the deepest member)")
        for name in ("rope_theta", "rms_norm_eps"):
            value = getattr(self, name)
            # `not value > 0` also refuses NaN, which compares false with everything
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0 \
                    or value == float("inf"):
                raise ConfigError(f"{name} must be a finite positive number, got {value!r}")
        architecture(self.architecture)

    @property
    def arch(self) -> Architecture:
        """The architecture's row: what the model, export and training read."""
        return architecture(self.architecture)

    # ---- exits and members ------------------------------------------------------------------

    @property
    def num_exits(self) -> int:
        return len(self.exits)

    @property
    def last_exit(self) -> int:
        """The deepest exit: the full model."""
        return len(self.exits) - 1

    def check_exit(self, exit: int) -> int:
        """Return `exit` if this family has member `exit`, else raise a clear `ConfigError`."""
        if isinstance(exit, bool) or not isinstance(exit, int) or not 0 <= exit < self.num_exits:
            raise ConfigError(
                f"exit={exit!r} is not a member of this family: it has exits 0..{self.last_exit} "
                f"after layers {list(self.exits)}")
        return exit

    def exit_layer(self, exit: int) -> int:
        """The backbone block `e_k` after which exit `exit` sits."""
        return self.exits[self.check_exit(exit)]

    def is_final_exit(self, exit: int) -> bool:
        return self.check_exit(exit) == self.last_exit

    def member_num_layers(self, exit: int) -> int:
        """Decoder layers of member `exit` as a standalone model (`e_k + 2`, or N)."""
        return self.num_layers if self.is_final_exit(exit) else self.exit_layer(exit) + 2

    # ---- parameter counts (from shapes alone, so `flow info` needs no torch) -----------------

    def block_parameters(self) -> int:
        h, d = self.hidden_size, self.head_dim
        attention = h * d * (2 * self.num_heads + 2 * self.num_kv_heads) + (2 * d if self.arch.qk_norm else 0)
        mlp = 3 * h * self.intermediate_size
        return attention + mlp + 2 * h

    def member_parameters(self, exit: int, head_is_embedding: bool = False) -> int:
        """Parameters member `exit` runs: embedding, its blocks and its exit branch (its LM head
        counted once with the embedding when `head_is_embedding`: one tensor on the device)."""
        head = self.hidden_size + (0 if head_is_embedding else self.vocab_size * self.hidden_size)
        branch = head if self.is_final_exit(exit) else head + self.block_parameters()
        return (self.vocab_size * self.hidden_size
                + (self.exit_layer(exit) + 1) * self.block_parameters() + branch)

    def total_parameters(self) -> int:
        head = self.hidden_size + self.vocab_size * self.hidden_size
        return (self.vocab_size * self.hidden_size + self.num_layers * self.block_parameters()
                + self.num_exits * head + self.last_exit * self.block_parameters())

    # ---- (de)serialisation ------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["exits"] = list(self.exits)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FamilyConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown architecture fields {unknown}; known fields are {sorted(known)}")
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.default is dataclasses.MISSING and f.name not in data)
        if missing:
            raise ConfigError(f"architecture is missing fields {missing}")
        return cls(**data)

    def replace(self, **changes: Any) -> FamilyConfig:
        return dataclasses.replace(self, **changes)


def with_final_exit(exits: list[int] | tuple[int, ...], num_layers: int) -> tuple[int, ...]:
    """Exit layers as asked plus the backbone's last layer, which is always the deepest exit."""
    layers = sorted(set(int(e) for e in exits) | {num_layers - 1})
    bad = [e for e in layers if not 0 <= e < num_layers]
    if bad:
        raise ConfigError(f"exits {bad} are outside the backbone's layers 0..{num_layers - 1}")
    return tuple(layers)


# Architectures `flow new --preset` builds. `vocab_size` is replaced by the tokenizer's.
PRESETS: dict[str, dict[str, Any]] = {
    # Unit tests and smoke runs: milliseconds per step.
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_layers=4, num_heads=4,
                 num_kv_heads=2, head_dim=16, exits=(1, 3), max_seq_len=256),
    # Trains on a 2-core CPU in minutes and already shows distinct exits.
    "demo": dict(vocab_size=4096, hidden_size=256, intermediate_size=704, num_layers=8, num_heads=4,
                 num_kv_heads=2, head_dim=64, exits=(2, 5, 7), max_seq_len=512),
    # Where a GPU user starts: members of 5, 9 and 16 layers (0.08, 0.11, 0.15 B parameters).
    "small": dict(vocab_size=32768, hidden_size=768, intermediate_size=2048, num_layers=16,
                  num_heads=12, num_kv_heads=4, head_dim=64, exits=(3, 7, 15), max_seq_len=2048),
    # Qwen3-0.6B's shape (28 layers, GQA 16/8, head_dim 128) with four exits (0.44 .. 0.75 B).
    "base": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_layers=28,
                 num_heads=16, num_kv_heads=8, head_dim=128, exits=(6, 13, 20, 27), max_seq_len=4096),
}


def preset(name: str, **overrides: Any) -> FamilyConfig:
    """The architecture preset `name`, with `overrides` applied."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return FamilyConfig(**{**PRESETS[name], **overrides})
