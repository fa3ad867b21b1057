"""Run megatron-core's CUDA-first code on CPU processes over gloo (DESIGN.md §3).

megatron-core 0.16 asks CUDA for the current device, for RNG states and for synchronisation, and
allocates buffers with `device="cuda"` or `torch.cuda.current_device()`. On a machine without a
GPU, `enable()` redirects exactly those calls to the CPU:

- `torch.cuda.current_device()` -> the CPU device;
- `torch.cuda.{get_rng_state, set_rng_state, manual_seed, manual_seed_all, synchronize}` and
  megatron's `tensor_parallel.random._{get,set}_cuda_rng_state` -> the CPU generator;
- megatron's warning that the CPU RNG moved inside a GPU RNG fork is filtered (they are one RNG);
- a `TorchFunctionMode` that rewrites `device="cuda"` (or a CUDA index) arguments to the CPU and
  makes `Tensor.cuda()` a no-op.

It is active only when CUDA is absent; on a GPU none of it runs and training uses NCCL. Training
uses megatron DDP with `finalize_model_grads` and a plain torch optimizer, because megatron's
optimizer wrappers allocate CUDA tensors directly.
"""

from __future__ import annotations

import logging

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_active_mode: TorchFunctionMode | None = None


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpu(TorchFunctionMode):
    """Rewrites CUDA device arguments to the CPU for every torch function call."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.cuda,):
            return args[0]
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs = {**kwargs, "device": _CPU}
        if func in (torch.Tensor.to,) and args[1:] and _is_cuda(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


def needed() -> bool:
    """True when there is no usable GPU, so megatron-core must be redirected to the CPU."""
    return not torch.cuda.is_available()


def enable() -> None:
    """Redirect megatron-core's CUDA calls to the CPU (idempotent; a no-op with a GPU)."""
    global _active_mode
    if not needed() or _active_mode is not None:
        return
    from megatron.core.tensor_parallel import random as tp_random

    def get_rng_state(device=None, **_):
        return torch.get_rng_state()

    def set_rng_state(state, device=None, **_):
        torch.set_rng_state(state)

    torch.cuda.current_device = lambda: _CPU
    torch.cuda.get_rng_state = get_rng_state
    torch.cuda.set_rng_state = set_rng_state
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator directly.
    torch.cuda.manual_seed = torch.cuda.manual_seed_all = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.synchronize = lambda device=None: None
    tp_random._get_cuda_rng_state = get_rng_state
    tp_random._set_cuda_rng_state = set_rng_state
    # megatron's RNG tracker warns when the CPU RNG moves inside a "GPU" RNG fork; here the GPU
    # RNG *is* the CPU RNG, so every forked initialisation would print that warning.
    logging.getLogger(tp_random.__name__).addFilter(
        lambda record: "CPU RNG state changed within GPU RNG context" not in record.getMessage())
    _active_mode = _CudaToCpu()
    _active_mode.__enter__()
