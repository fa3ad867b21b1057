"""`flow train`: validate the config, launch torchrun with TP×PP×DP ranks, then convert.

Everything that can be wrong with a config is found by `make_plan` before a process starts. The
ranks run `training.trainer`; on a GPU machine one rank per GPU (NCCL), otherwise one CPU process
per rank (gloo) with the cores shared out. A run directory (`checkpoint.dir`) that already holds
checkpoints is resumed, so rerunning the same command after a failure continues where it stopped.
Several nodes: run `torchrun --nnodes ... -m training.trainer RUN_DIR` on each, after one
`flow train --config FILE --prepare-only` has written RUN_DIR.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from flow.cores import threads_per_process
from flow.errors import FlowError
from training import run_dir
from training.config import TrainConfig
from training.plan import RunPlan, check_resumable, make_plan


class TrainingFailed(FlowError):
    """A rank exited with an error; the newest complete checkpoint is kept."""


def prepare(config_path: Path | str) -> RunPlan:
    """Load, resolve and validate a config and write the run directory's train_config.json."""
    plan = make_plan(TrainConfig.load(config_path))
    check_resumable(plan)
    _check_devices(plan.config.parallel.world_size)
    plan.save()
    return plan


def _check_devices(world_size: int) -> None:
    import shutil

    if shutil.which("nvidia-smi") is None:
        return  # CPU processes: any number runs, the cores are shared out
    import torch

    if torch.cuda.is_available() and world_size > torch.cuda.device_count():
        raise FlowError(f"tensor x pipeline x data = {world_size} ranks but this node has "
                        f"{torch.cuda.device_count()} GPUs; lower the parallel sizes or use torchrun "
                        f"across nodes (see `flow train --help`)")


def run_ranks(plan: RunPlan, stop_after: int | None = None) -> None:
    """Start torchrun with one process per rank and wait for it."""
    world = plan.config.parallel.world_size
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads_per_process(world)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={world}", "-m", "training.trainer", str(plan.run_dir)]
    if stop_after is not None:
        command += ["--stop-after", str(stop_after)]
    result = subprocess.run(command, env=env)
    if result.returncode != 0:
        raise TrainingFailed(
            f"training failed (exit code {result.returncode}, rank logs above); the newest complete "
            f"checkpoint in {plan.run_dir} is kept: rerun the same command to resume")


def train(config_path: Path | str, stop_after: int | None = None) -> Path | None:
    """Run (or resume) training; return the family directory, or None when stopped early."""
    plan = prepare(config_path)
    run_ranks(plan, stop_after)
    step = run_dir.latest_step(plan.run_dir)
    if step is None or step < plan.config.train.steps:
        return None
    from training.export import checkpoint_to_family

    checkpoint_to_family(plan.run_dir, plan.config.output, overwrite=True)
    return Path(plan.config.output)
