"""The cloud tier's engine, the vLLM v1 way: a steppable core, a process around it, and clients.

    core.py          `Engine`: sessions, submitted work, `step()` (one batched forward per block
                     range), validation; no sockets, threads or asyncio
    requests.py      `Work` and the records of queued jobs, sessions and a step's chunks
    kv_pool.py       `KVPool`: the KV slots allocated up front, LRU eviction, TTL, bytes
    scheduler.py     `Scheduler` and its policy `SingleRowsFirst`: which work a step takes
    config.py        `EngineLimits` (the `flow serve` engine flags) and `EngineConfig` (what a
                     worker receives)
    client.py        `EngineClient`: the coroutines the gRPC front end calls
    in_process.py    `InProcessEngineClient`: the engine on a thread of the serving process
    multiprocess.py  `MultiprocessEngineClient`: engines in worker processes behind ZeroMQ
    worker.py        the worker process (`python -m cloud.engine.worker FAMILY --connect ...`)
    frames.py        the messages between the front end and its workers
    keys.py          `WorkerKey`: the CURVE key pair that admits workers (`python -m
                     cloud.engine.keys FILE` writes one)

`Engine`, `EngineLimits`, `EngineConfig` and `Work` are importable from here. `Engine` (torch) is
imported on first use: every `flow` command, on a device too, registers `flow serve`'s flags from
`EngineLimits`, and a device has no torch.
"""

from cloud.engine.config import EngineConfig, EngineLimits
from cloud.engine.requests import Work

__all__ = ["Engine", "EngineConfig", "EngineLimits", "Work"]


def __getattr__(name: str):
    if name == "Engine":
        from cloud.engine.core import Engine

        return Engine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
