"""A training run's directory, readable without torch or megatron-core.

    <dir>/train_config.json the resolved run (`training.plan.RunPlan`: config, architecture, tokenizer)
    <dir>/iter_0000100/     a megatron-core dist checkpoint (see `training.checkpoint`)
    <dir>/latest            the step of the newest complete checkpoint (written last, atomically)
    <dir>/metrics.jsonl     one line per training step (rank 0)
"""

from __future__ import annotations

import json
from pathlib import Path

from flow.errors import ArtifactError
from flow.fsutil import atomic_file

LATEST = "latest"
CONFIG_FILE = "train_config.json"


def iteration_dir(root: Path, step: int) -> Path:
    return root / f"iter_{step:07d}"


def latest_step(root: Path | str) -> int | None:
    path = Path(root) / LATEST
    return int(path.read_text().strip()) if path.is_file() else None


def mark_latest(root: Path, step: int) -> None:
    with atomic_file(root / LATEST) as tmp:
        tmp.write_text(f"{step}\n")


def resolve(path: Path | str) -> Path:
    """A checkpoint iteration directory from either itself or its run directory (newest)."""
    path = Path(path)
    if (path / "metadata.json").is_file():
        return path
    step = latest_step(path)
    if step is None:
        raise ArtifactError(f"{path} holds no complete megatron checkpoint (no {LATEST} file and "
                            f"no metadata.json); point at a run's checkpoint directory")
    return iteration_dir(path, step)


def write_config(root: Path, config_json: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    with atomic_file(root / CONFIG_FILE) as tmp:
        tmp.write_text(config_json)


def read_config(root: Path) -> dict:
    path = root / CONFIG_FILE
    if not path.is_file():
        raise ArtifactError(f"{root} has no {CONFIG_FILE}; is it a `flow train` checkpoint directory?")
    return json.loads(path.read_text())
