"""Process-group set-up for one training rank: NCCL on GPUs, gloo plus `cpu_compat` otherwise."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from training import cpu_compat


def initialize(tensor: int, pipeline: int, seed: int, timeout_minutes: int = 10) -> None:
    """Join the torchrun job and build megatron-core's tensor/pipeline/data parallel groups."""
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        backend = "nccl"
    else:
        cpu_compat.enable()
        backend = "gloo"
    if "WORLD_SIZE" not in os.environ:  # a single process outside torchrun (e.g. `flow convert`)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0",
                          WORLD_SIZE="1", LOCAL_RANK="0")
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel(tensor, pipeline)
    # Registers the model-parallel RNG streams megatron's layers fork, even without dropout.
    model_parallel_cuda_manual_seed(seed)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shutdown() -> None:
    from megatron.core import parallel_state

    if dist.is_initialized():
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
