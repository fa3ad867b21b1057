"""The training run's configuration: one file (YAML or TOML), checked before any process starts.

    model:      {preset: demo, exits: [2, 5, 7], ...any FamilyConfig field}
    init:       {source: random, seed: 0}  |  {source: hf, path: DIR}  |  {source: family, path: DIR}
    data:       {corpus: runs/demo/corpus, tokens: DIR}   (tokens: default the corpus itself)
    parallel:   {tensor: 1, pipeline: 1, data: 1}
    train:      {steps, seq_len, micro_batch_size, global_batch_size, lr, min_lr, warmup_steps,
                 weight_decay, grad_clip, seed, freeze_backbone, freeze_exit_heads}
    exit_loss:  {schedule: constant|warmup|decay, weights: [...], warmup_steps, decay_to,
                 distill_alpha, distill_temperature}
    eval:       {interval, batches}
    checkpoint: {dir, interval}
    output:     DIR of the family artifact written at the end

The config is saved with every checkpoint and into the family's provenance.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flow.config import PRESETS, FamilyConfig, preset, with_final_exit
from flow.errors import ConfigError, DataError

INIT_SOURCES = ("random", "hf", "family")
VOCAB_MULTIPLE = 128  # padded vocabulary: divisible by any tensor-parallel size up to 128


@dataclass
class ModelSection:
    """The architecture of a randomly initialised family.

    `preset`: a name in `flow.config.PRESETS`. `overrides`: any `FamilyConfig` field replacing
    the preset's (written beside `preset` in the file); `exits` lists the early exit layers, the
    last layer being added. With `init.source` hf or family the architecture comes from
    `init.path` and only `exits` is read.
    """

    preset: str = "demo"
    overrides: dict[str, Any] = field(default_factory=dict)  # any FamilyConfig field


@dataclass
class InitSection:
    """The weights training starts from.

    `source`: random (seeded by `seed`), hf (a Hugging Face checkpoint directory at `path`) or
    family (a family artifact at `path`). `seed` only seeds a random start.
    """

    source: str = "random"  # random | hf | family
    path: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        # checked here, not in `validate`: the plan reads the start's tokenizer before validating
        # (whether `path` exists is `validate`'s: a saved plan is read where it may not)
        if self.source not in INIT_SOURCES:
            raise ConfigError(f"init.source {self.source!r} is not one of {', '.join(INIT_SOURCES)}")
        if self.source != "random" and not self.path:
            raise ConfigError(f"init.path must name a directory for init.source={self.source}")


@dataclass
class DataSection:
    """What the run trains on: the corpus of documents and the token streams encoded from it."""

    corpus: str = "runs/demo/corpus"  # the documents (`flow corpus`), recorded in provenance
    # The token streams (`flow tokenize`); a pretrained family's own tokenizer writes them to a
    # directory of their own (`flow tokenize CORPUS --tokenizer FAMILY/tokenizer.json --out DIR`).
    tokens: str | None = None  # default: the corpus directory

    @property
    def tokens_dir(self) -> Path:
        return Path(self.tokens or self.corpus)


@dataclass
class ParallelSection:
    """megatron-core's parallel sizes; one rank per tensor x pipeline x data combination.

    `tensor` splits every layer's weights, `pipeline` the layers into consecutive stages, `data`
    the global batch.
    """

    tensor: int = 1
    pipeline: int = 1
    data: int = 1

    @property
    def world_size(self) -> int:
        """The number of ranks (processes) the run needs."""
        return self.tensor * self.pipeline * self.data


@dataclass
class TrainSection:
    """The optimisation: steps, batch shapes, AdamW and its learning-rate schedule.

    `seq_len` tokens per window; a step takes `global_batch_size` windows, each data-parallel
    rank `global_batch_size / data` of them in micro-batches of `micro_batch_size`. The learning
    rate warms up linearly over `warmup_steps` to `lr`, then follows a cosine to `min_lr` at
    `steps` (`training.schedules`). `weight_decay` applies to matrices only; `grad_clip` bounds
    the global gradient norm (0: no clipping). `seed` orders the training windows and seeds
    megatron-core's random streams.
    """

    steps: int = 300
    seq_len: int = 256
    micro_batch_size: int = 4
    global_batch_size: int = 16
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    # Exit tuning (EE-Tuning / Ruyi2): train only the early exit branches; the backbone runs
    # without autograd and holds no gradients or optimizer state.
    freeze_backbone: bool = False
    # Keep the early exits' LM heads as initialised (an import of a model with tied embeddings
    # starts them as the embedding, so a member can stay tied and small).
    freeze_exit_heads: bool = False


@dataclass
class ExitLossSection:
    """How the exits' losses are weighed and what each early exit learns from.

    Loss = Σ_k λ_k(step) · objective_k. `weights` are the w_k (one per exit, last included);
    `schedule` moves the early exits' λ_k over the run (`training.schedules`): constant, warmup
    (0 to w_k over `warmup_steps`) or decay (w_k to `decay_to` · w_k at the last step). An early
    exit's objective is CE, or with `distill_alpha` > 0 CE blended with distillation from the
    last exit at temperature `distill_temperature` (`training.exit_loss`).
    """

    schedule: str = "constant"  # constant | warmup | decay
    weights: list[float] | None = None  # one per exit; default 1.0 each
    warmup_steps: int = 100  # warmup: early exits ramp from 0 to their weight
    decay_to: float = 0.25  # decay: early exits end at this fraction of their weight
    # Self-distillation of the early exits from the last one (training.exit_loss):
    # (1 - α)·CE + α·τ²·KL(p_full,τ ‖ p_exit,τ); α = 0 is plain CE.
    distill_alpha: float = 0.0
    distill_temperature: float = 1.0


@dataclass
class EvalSection:
    """Validation: every `interval` steps (and at the last), the CE per exit over `batches`
    global batches of the validation split."""

    interval: int = 100
    batches: int = 4


@dataclass
class CheckpointSection:
    """The run directory `dir` (plan, checkpoints, metrics) and a checkpoint every `interval`
    steps; a run whose directory holds a checkpoint resumes from the newest."""

    dir: str = "runs/demo/checkpoints"
    interval: int = 100


@dataclass
class TrainConfig:
    """A whole run's configuration, one section per concern (see the module docstring);
    `output` is the family directory written from the last checkpoint."""

    model: ModelSection = field(default_factory=ModelSection)
    init: InitSection = field(default_factory=InitSection)
    data: DataSection = field(default_factory=DataSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    train: TrainSection = field(default_factory=TrainSection)
    exit_loss: ExitLossSection = field(default_factory=ExitLossSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    output: str = "runs/demo/family"

    # ---- reading and writing ----------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        data = dict(data)
        model = dict(data.pop("model", {}) or {})
        sections = {"model": ModelSection(preset=model.pop("preset", "demo"), overrides=model)}
        for f in dataclasses.fields(cls):
            if f.name in ("model", "output") or f.name not in data:
                continue
            sections[f.name] = _section(f.type, f.name, data.pop(f.name))
        if "output" in data:
            sections["output"] = str(data.pop("output"))
        if data:
            raise ConfigError(f"unknown config sections {sorted(data)}; known: "
                              f"{[f.name for f in dataclasses.fields(cls)]}")
        return cls(**sections)

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"no config file at {path}")
        text = path.read_text()
        try:
            if path.suffix == ".toml":
                data = tomllib.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text) or {}
        except Exception as err:  # yaml and toml raise their own error types
            raise ConfigError(f"{path} is not valid {'TOML' if path.suffix == '.toml' else 'YAML'}: {err}") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["model"] = {"preset": self.model.preset, **self.model.overrides}
        return data

    # ---- derived values ---------------------------------------------------------------------

    def family_config(self, tokenizer_vocab: int | None) -> FamilyConfig:
        """The architecture: the preset with overrides, vocabulary padded for tensor parallelism."""
        if self.model.preset not in PRESETS:
            raise ConfigError(f"unknown model preset {self.model.preset!r}; choose one of {sorted(PRESETS)}")
        overrides = dict(self.model.overrides)
        if "exits" in overrides:
            layers = overrides.get("num_layers", PRESETS[self.model.preset]["num_layers"])
            overrides["exits"] = with_final_exit(overrides["exits"], layers)
        if tokenizer_vocab is not None and "vocab_size" not in overrides:
            overrides["vocab_size"] = math.ceil(tokenizer_vocab / VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        return preset(self.model.preset, **overrides)

    @property
    def num_microbatches(self) -> int:
        """Micro-batches each data-parallel rank runs per step."""
        t, p = self.train, self.parallel
        return t.global_batch_size // (t.micro_batch_size * p.data)

    def exit_weights(self, num_exits: int) -> list[float]:
        """The configured w_k of each exit (before the schedule), checked against `num_exits`."""
        weights = self.exit_loss.weights or [1.0] * num_exits
        if len(weights) != num_exits:
            raise ConfigError(f"exit_loss.weights has {len(weights)} entries, the family has "
                              f"{num_exits} exits")
        return [float(w) for w in weights]

    # ---- validation -------------------------------------------------------------------------

    def validate(self, family: FamilyConfig, train_tokens: int | None = None) -> None:
        """Refuse, with what to change, any setting that would fail after processes start."""
        p, t, e = self.parallel, self.train, self.exit_loss
        for name in ("tensor", "pipeline", "data"):
            if getattr(p, name) < 1:
                raise ConfigError(f"parallel.{name} must be >= 1")
        for name in ("micro_batch_size", "global_batch_size"):
            if getattr(t, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(t, name)}")
        if family.num_heads % p.tensor or family.num_kv_heads % p.tensor:
            raise ConfigError(
                f"parallel.tensor={p.tensor} must divide the attention heads ({family.num_heads}) and "
                f"KV heads ({family.num_kv_heads}); use a tensor size among "
                f"{[d for d in range(1, family.num_kv_heads + 1) if family.num_kv_heads % d == 0]}")
        if family.intermediate_size % p.tensor or family.vocab_size % p.tensor:
            raise ConfigError(f"parallel.tensor={p.tensor} must divide the MLP width "
                              f"({family.intermediate_size}) and the vocabulary ({family.vocab_size})")
        if family.num_layers % p.pipeline:
            raise ConfigError(
                f"parallel.pipeline={p.pipeline} must divide the {family.num_layers} layers; use one of "
                f"{[d for d in range(1, family.num_layers + 1) if family.num_layers % d == 0]}")
        if t.global_batch_size % (t.micro_batch_size * p.data):
            raise ConfigError(
                f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
                f"micro_batch_size x parallel.data ({t.micro_batch_size} x {p.data})")
        if not 0 < t.seq_len <= family.max_seq_len:
            raise ConfigError(f"train.seq_len ({t.seq_len}) must lie in 1..{family.max_seq_len} "
                              f"(the family's context)")
        if t.steps < 1 or t.lr <= 0 or t.min_lr < 0 or t.warmup_steps < 0:
            raise ConfigError("train.steps must be >= 1, train.lr > 0, min_lr and warmup_steps >= 0")
        if e.schedule not in ("constant", "warmup", "decay"):
            raise ConfigError(f"exit_loss.schedule {e.schedule!r} is not one of constant, warmup, decay")
        weights = self.exit_weights(family.num_exits)
        if not all(isinstance(w, int | float) and not isinstance(w, bool) and math.isfinite(w)
                   and w >= 0 for w in weights):
            raise ConfigError(f"exit_loss.weights must be finite numbers >= 0, got {weights}")
        self._validate_exit_tuning(family)
        if self.init.source != "random" and not Path(self.init.path).is_dir():
            raise ConfigError(f"init.path {self.init.path!r} must be an existing directory for "
                              f"init.source={self.init.source}")
        if self.eval.interval < 1 or self.checkpoint.interval < 1 or self.eval.batches < 1:
            raise ConfigError("eval.interval, eval.batches and checkpoint.interval must be >= 1")
        if train_tokens is not None and train_tokens < t.global_batch_size * (t.seq_len + 1):
            raise DataError(f"the training split has {train_tokens} tokens, fewer than one global "
                            f"batch ({t.global_batch_size} x {t.seq_len + 1}); use a larger corpus")

    def _validate_exit_tuning(self, family: FamilyConfig) -> None:
        e, p = self.exit_loss, self.parallel
        if not 0.0 <= e.distill_alpha <= 1.0:
            raise ConfigError(f"exit_loss.distill_alpha ({e.distill_alpha}) must lie in 0..1")
        if e.distill_temperature <= 0:
            raise ConfigError(f"exit_loss.distill_temperature ({e.distill_temperature}) must be > 0")
        if self.train.freeze_backbone and family.num_exits < 2:
            raise ConfigError("train.freeze_backbone leaves nothing to train: the family has no "
                              "early exit; list some in model.exits")
        if e.distill_alpha > 0:
            # The teacher (the last exit) exists on the last pipeline stage only. Sending its
            # vocabulary-sized logits back through the pipeline, or caching them, costs more than
            # it saves (README, "Exit tuning of a pretrained backbone").
            last_stage = stage_layers(family.num_layers, p.pipeline, p.pipeline - 1)
            elsewhere = [layer for layer in family.exits[:-1] if layer not in last_stage]
            if elsewhere:
                raise ConfigError(
                    f"exit_loss.distill_alpha > 0 needs every early exit on the last pipeline stage "
                    f"(layers {last_stage.start}..{last_stage.stop - 1}), where the teacher is; exits "
                    f"after layers {elsewhere} are not: lower parallel.pipeline or set distill_alpha: 0")


def stage_layers(num_layers: int, pipeline: int, stage: int) -> range:
    """The backbone layers pipeline stage `stage` of `pipeline` holds (megatron's even split)."""
    per_stage = num_layers // pipeline
    return range(stage * per_stage, (stage + 1) * per_stage)


def _section(section_type: Any, name: str, data: Any) -> Any:
    cls = globals()[section_type] if isinstance(section_type, str) else section_type
    if not isinstance(data, dict):
        raise ConfigError(f"config section {name!r} must be a mapping, got {data!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown keys {unknown} in section {name!r}; known: {sorted(known)}")
    for spec in dataclasses.fields(cls):
        if spec.name in data:
            _check_number(f"{name}.{spec.name}", spec.type, data[spec.name])
    return cls(**data)


def _check_number(name: str, annotation: str, value: Any) -> None:
    """`ConfigError` unless a field annotated `int` holds an integer and one annotated `float` a
    finite number (YAML reads `.nan`, `.inf` and `2.5` as easily as `3`)."""
    if annotation == "int" and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if annotation == "float" and (isinstance(value, bool) or not isinstance(value, int | float)
                                  or not math.isfinite(value)):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
