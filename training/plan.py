"""Everything a run needs to know before any process starts, checked up front.

`make_plan` resolves the family's architecture (preset + overrides, a Hugging Face checkpoint or
an existing family), finds the tokenizer and token streams, and validates the whole config; a bad
config fails here with a message saying what to change, never inside eight worker processes.
The resulting `RunPlan` is saved as the run directory's train_config.json, which every rank, the
conversion into a family and a resumed run read back (`RunPlan.load`). Needs neither torch nor
megatron-core.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flow import artifact
from flow.config import FamilyConfig, with_final_exit
from flow.data.tokenizer import EOS_TOKEN, TOKENIZER_FILE, load_tokenizer, stop_tokens_of
from flow.data.tokens import TOKENS_JSON, open_tokens
from flow.errors import ArtifactError, ConfigError, DataError
from flow.hf import end_token_ids, read_hf_config
from training.config import TrainConfig
from training.run_dir import CONFIG_FILE, read_config, write_config


@dataclass
class RunPlan:
    """A resolved run: the train config, the architecture, the tokenizer and the end tokens.

    `to_dict`/`from_dict` are the one place that knows the layout of train_config.json:
    {"train": TrainConfig, "family": FamilyConfig, "tokenizer": path, "stop_tokens": [...]}.
    """

    config: TrainConfig
    family: FamilyConfig
    tokenizer: Path
    # Counted when the plan is made (for the launch message); not saved, so None once loaded.
    train_tokens: int | None = None
    stop_tokens: tuple[str, ...] = (EOS_TOKEN,)  # the family's end tokens, kept through training

    @property
    def run_dir(self) -> Path:
        return Path(self.config.checkpoint.dir)

    def to_dict(self) -> dict[str, Any]:
        return {"train": self.config.to_dict(), "family": self.family.to_dict(),
                "tokenizer": str(self.tokenizer), "stop_tokens": list(self.stop_tokens)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunPlan:
        missing = sorted({"train", "family", "tokenizer"} - set(data))
        if missing:
            raise ArtifactError(f"the run config lacks {missing}; was it written by `flow train`?")
        # Runs saved before stop tokens were recorded ended with the corpus separator.
        stop_tokens = tuple(data.get("stop_tokens", (EOS_TOKEN,)))
        return cls(TrainConfig.from_dict(data["train"]), FamilyConfig.from_dict(data["family"]),
                   Path(data["tokenizer"]), stop_tokens=stop_tokens)

    def save(self) -> None:
        """Write train_config.json into the run directory (`checkpoint.dir`)."""
        write_config(self.run_dir, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, root: Path | str) -> RunPlan:
        """The plan saved in run directory `root`."""
        return cls.from_dict(read_config(Path(root)))


def _tokenizer_for(config: TrainConfig) -> Path:
    init = config.init
    if init.source == "random":
        return Path(config.data.corpus) / TOKENIZER_FILE
    path = Path(init.path) / TOKENIZER_FILE
    if not path.is_file():
        raise DataError(f"init.path {init.path} has no {TOKENIZER_FILE}; training needs the tokenizer "
                        f"the weights were trained with")
    return path


def _family_config(config: TrainConfig, tokenizer_vocab: int) -> FamilyConfig:
    init = config.init
    exits = config.model.overrides.get("exits")
    if init.source == "random":
        return config.family_config(tokenizer_vocab)
    if init.source == "hf":
        architecture, _ = read_hf_config(Path(init.path))
        if exits is None:
            raise ConfigError("model.exits must list the exit layers when init.source is hf")
        return FamilyConfig(**architecture, exits=with_final_exit(exits, architecture["num_layers"]))
    family = artifact.read_manifest(init.path, verify=False).config
    if exits is not None and with_final_exit(exits, family.num_layers) != family.exits:
        raise ConfigError(f"model.exits {exits} differ from the exits {list(family.exits)} of "
                          f"the family in init.path; remove model.exits or start from random/hf")
    return family


def make_plan(config: TrainConfig) -> RunPlan:
    """Resolve and validate a run; raise `ConfigError`/`DataError` naming what to change."""
    corpus, tokens = Path(config.data.corpus), config.data.tokens_dir
    if not (tokens / TOKENS_JSON).is_file():
        if config.data.tokens is not None:
            raise DataError(f"data.tokens {tokens} has no token streams; write them with "
                            f"`flow tokenize {corpus} --tokenizer TOKENIZER --out {tokens}`")
        raise DataError(f"data.corpus {corpus} has no token streams; build them with "
                        f"`flow corpus {corpus}`, `flow tokenizer {corpus}` and `flow tokenize {corpus}`")
    tokenizer_path = _tokenizer_for(config)
    tokenizer_vocab = load_tokenizer(tokenizer_path).get_vocab_size(with_added_tokens=True)
    family = _family_config(config, tokenizer_vocab)
    if tokenizer_vocab > family.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer_vocab} tokens, more than the model's "
                          f"vocab_size {family.vocab_size}")
    train_tokens = len(open_tokens(tokens, "train", tokenizer_path))
    open_tokens(tokens, "val", tokenizer_path)
    config.validate(family, train_tokens)
    return RunPlan(config, family, tokenizer_path, train_tokens, _stop_tokens(config, tokenizer_path))


def _stop_tokens(config: TrainConfig, tokenizer_path: Path) -> tuple[str, ...]:
    """The end tokens of the weights a run starts from (a random init: the corpus separator)."""
    init = config.init
    if init.source == "family":
        manifest = artifact.read_manifest(init.path, verify=False)
        return manifest.tokenizer.stop_tokens if manifest.tokenizer else (EOS_TOKEN,)
    if init.source == "hf":
        return stop_tokens_of(load_tokenizer(tokenizer_path), end_token_ids(Path(init.path)))
    return (EOS_TOKEN,)


def check_resumable(plan: RunPlan) -> None:
    """Refuse to continue a run directory that was started with another model or data."""
    if not (plan.run_dir / CONFIG_FILE).is_file():
        return
    previous = RunPlan.load(plan.run_dir)
    for what, before, now in (("architecture", previous.family, plan.family),
                              ("tokenizer", previous.tokenizer, plan.tokenizer)):
        if before != now:
            raise ConfigError(f"checkpoint.dir {plan.run_dir} holds a run with another {what}; "
                              f"use a new checkpoint.dir or delete the old one")
    for section in ("data", "init", "exit_loss"):
        if getattr(previous.config, section) != getattr(plan.config, section):
            raise ConfigError(f"checkpoint.dir {plan.run_dir} holds a run with a different "
                              f"`{section}` section; use a new checkpoint.dir to change it")
