"""megatron-core distributed checkpoints of the model and the optimizer, resumable and reshardable.

A checkpoint is complete only once the run directory's `latest` names it (`training.run_dir`), so a
run killed mid-save resumes from the previous one. The model half can be loaded under any (TP, PP)
layout (that is how `flow convert` reads a TP×PP checkpoint into one process); the optimizer half
maps onto the same parameters.

A checkpoint is code: torch's distributed checkpoint reader unpickles its `.metadata`, so loading a
crafted one runs whatever it says. Each save therefore records the SHA-256 of every file it wrote
(`flow_checkpoint.json`), and loading refuses a directory whose files are not exactly those unless
the caller trusts it (`flow convert --trust-checkpoint`). The record guards against a checkpoint
that was swapped or edited; whoever can rewrite the record too must be kept out of the directory.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.optimizer import (
    get_param_id_to_sharded_param_map,
    optim_state_to_sharding_state,
)

from flow.artifact import file_sha256
from flow.errors import ArtifactError
from flow.fsutil import atomic_file
from training.run_dir import iteration_dir, mark_latest

MANIFEST = "flow_checkpoint.json"  # in each iter_* directory: {"files": {relative path: sha256}}


def _file_hashes(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): file_sha256(p) for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def _record_files(directory: Path) -> None:
    record = json.dumps({"files": _file_hashes(directory)}, indent=1) + "\n"  # before the temp file
    with atomic_file(directory / MANIFEST) as tmp:
        tmp.write_text(record)


def check_written_by_flow(directory: Path) -> None:
    """`ArtifactError` unless `directory` holds exactly the files a `save` recorded."""
    trust_hint = ("loading a checkpoint unpickles its .metadata, so a crafted one runs code; if "
                  "you trust where it came from, convert it with `flow convert --trust-checkpoint`")
    record = directory / MANIFEST
    if not record.is_file():
        raise ArtifactError(f"{directory} has no {MANIFEST}: flow train did not write it (or an "
                            f"older flow did); {trust_hint}")
    try:
        recorded = json.loads(record.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        raise ArtifactError(f"{record} is not a record flow train wrote; {trust_hint}") from None
    actual = _file_hashes(directory)
    changed = sorted(name for name in set(actual) | set(recorded) if actual.get(name) != recorded.get(name))
    if changed:
        raise ArtifactError(f"{directory}: {', '.join(changed[:4])}{' …' if len(changed) > 4 else ''} "
                            f"are not the files flow train wrote (added, removed or changed); "
                            f"{trust_hint}")


def _optimizer_sharded_state(optimizer: torch.optim.Optimizer, model_state: dict) -> dict:
    # AdamW's per-parameter "step" is a scalar, not parameter-shaped: it is saved as the run's step.
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for p in params:  # loading needs the state tensors to exist before AdamW's first step
        state = optimizer.state[p]
        if "exp_avg" not in state:
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
    state = optimizer.state_dict()
    optim_state_to_sharding_state(state, get_param_id_to_sharded_param_map(model_state, params),
                                  exclude_keys=("step",))
    return state


def save(root: Path, step: int, model, optimizer: torch.optim.Optimizer, extra: dict) -> Path:
    """Collectively save model and optimizer at `step`; rank 0 then points `latest` at it."""
    target = iteration_dir(root, step)
    if dist.get_rank() == 0:
        shutil.rmtree(target, ignore_errors=True)  # a half-written save of this same step
        target.mkdir(parents=True)
    dist.barrier()
    model_state = model.sharded_state_dict()
    state = {"model": model_state, "optimizer": _optimizer_sharded_state(optimizer, model_state),
             "step": step, "extra": extra}
    dist_checkpointing.save(state, str(target))
    dist.barrier()
    if dist.get_rank() == 0:
        _record_files(target)
        mark_latest(root, step)
    dist.barrier()
    return target


def load(path: Path, model, optimizer: torch.optim.Optimizer | None, trust: bool = False) -> dict:
    """Load a checkpoint into this rank's model (and optimizer); return its common state.

    Unless `trust`, the checkpoint's files must be the ones its `save` recorded.
    """
    if not trust:
        check_written_by_flow(Path(path))
    model_state = model.sharded_state_dict()
    state: dict = {"model": model_state}
    if optimizer is not None:
        state["optimizer"] = _optimizer_sharded_state(optimizer, model_state)
    loaded = dist_checkpointing.load(state, str(path))
    model.load_state_dict(loaded["model"])
    common = dist_checkpointing.load_common_state_dict(str(path))
    if optimizer is not None:
        optimizer_state = loaded["optimizer"]
        for param_state in optimizer_state["state"].values():
            param_state["step"] = torch.tensor(float(common["step"]))
        optimizer.load_state_dict(optimizer_state)
    return {"step": common["step"], "extra": common.get("extra", {})}
