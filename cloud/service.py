"""Putting a tier together: family -> engine -> engine client -> gRPC server, and running it.

`run(...)` serves until SIGINT/SIGTERM (what `flow serve` calls); `ServerThread` runs the same
server on a background event loop in this process, for tests, benchmarks and the demo.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

from cloud.metrics import TierMetrics
from cloud.server import ServerConfig, TierServer, TierService
from cloud.workers import WorkerPool

log = logging.getLogger("flow.cloud")


@dataclass
class TierSpec:
    """What a tier serves: a family, from which exit, with which engine limits."""

    family_dir: Path
    from_exit: int
    limits: object = None  # cloud.engine.EngineLimits; None = defaults
    server: ServerConfig = field(default_factory=ServerConfig)
    workers: int = 0  # engine worker processes to spawn; 0 = the engine runs in this process
    endpoint: str | None = None  # ROUTER endpoint for workers (default: an ipc:// path)
    metrics_port: int | None = None  # serve Prometheus /metrics here (0 = any free port)
    # An edge tier: answer at exit `to_exit` when its `policy` passes `threshold` (None: the
    # policy's default), else forward to the tier at `next_address` (a `flow.tier.NextTier`
    # object works too, for tests).
    to_exit: int | None = None
    next_address: object = None
    policy: str = "max_prob"
    threshold: float | None = None
    next_token: str | None = None


def build(spec: TierSpec, family=None) -> tuple[TierServer, object]:
    """The server and its engine client for `spec` (not started)."""
    from cloud.engine import Engine, EngineLimits
    from cloud.runner import InProcessEngine
    from flow.errors import ConfigError
    from flow.family import Family

    family = family or Family.load(spec.family_dir)
    config = family.config
    config.check_exit(spec.from_exit)
    if spec.from_exit == config.last_exit:
        raise ConfigError(f"--from-exit {spec.from_exit} is the full model: nothing is left to serve "
                          f"after it; choose one of 0..{config.num_exits - 2}")
    limits = spec.limits or EngineLimits()
    metrics = TierMetrics()
    edge = spec.to_exit is not None and spec.to_exit != config.last_exit
    if edge and spec.next_address is None:
        raise ConfigError(f"--to-exit {spec.to_exit} stops before the full model: give --next "
                          f"HOST:PORT of the tier to forward to")
    if spec.workers or spec.endpoint:
        engine = WorkerPool(spec.endpoint or _ipc_endpoint(), family.family_hash(),
                            on_step=metrics.observe_step)
    else:
        engine = InProcessEngine(Engine(family, limits=limits, to_exit=spec.to_exit if edge else None,
                                        policy=spec.policy), on_step=metrics.observe_step)
    common = (engine, family.family_hash(), config.vocab_size, spec.server)
    if edge:
        from cloud.edge import EdgeService
        from flow.confidence import ExitPolicy
        from flow.tier_client import GrpcTier

        next_tier = spec.next_address
        if isinstance(next_tier, str):
            next_tier = GrpcTier(next_tier, token=spec.next_token)
        service = EdgeService(*common, max_rows=limits.max_rows_per_request, metrics=metrics,
                              next_tier=next_tier, to_exit=spec.to_exit,
                              exit_policy=ExitPolicy(spec.policy, spec.threshold),
                              hidden_size=config.hidden_size, max_seq_len=config.max_seq_len)
    else:
        service = TierService(*common, max_rows=limits.max_rows_per_request, metrics=metrics)
    return TierServer(service, spec.server), engine


def _ipc_endpoint() -> str:
    import os
    import tempfile

    return f"ipc://{tempfile.gettempdir()}/flow-engine-{os.getpid()}-{id(object())}.sock"


def _worker_args(spec: TierSpec) -> list[str]:
    from cloud.engine import EngineLimits

    limits = spec.limits or EngineLimits()
    # Workers share the machine: split its cores between them rather than oversubscribe.
    threads = max(1, (os.cpu_count() or 1) // max(1, spec.workers))
    args = ["--max-sessions", str(limits.max_sessions), "--max-rows", str(limits.max_rows_per_request),
            "--max-batch-rows", str(limits.max_batch_rows), "--session-ttl", str(limits.session_ttl_s),
            "--max-context", str(limits.max_context), "--threads", str(threads)]
    if spec.to_exit is not None:
        args += ["--to-exit", str(spec.to_exit), "--policy", spec.policy]
    return args


async def serve(spec: TierSpec, ready=None, family=None) -> None:
    """Serve until cancelled or signalled; `ready(server)` is called once it listens."""

    server, engine = build(spec, family)
    if isinstance(engine, WorkerPool):
        engine.spawn(spec.family_dir, spec.workers, _worker_args(spec))
        await engine.start(wait_for=spec.workers)
    else:
        await engine.start()
    await server.start()
    metrics = server.service.metrics
    http = metrics.serve_http(spec.metrics_port, spec.server.host) if spec.metrics_port is not None \
        else None
    server.metrics_port = http.server_port if http is not None else None
    poller = asyncio.create_task(_poll_stats(engine, metrics))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready(server)
    try:
        await stop.wait()
    finally:
        poller.cancel()
        await server.stop()
        await engine.stop()
        if http is not None:
            http.shutdown()


async def _poll_stats(engine, metrics, every_s: float = 1.0) -> None:
    """Keep the metrics' engine snapshot fresh (read at scrape time)."""
    while True:
        try:
            metrics.engine.snapshot = await engine.stats()
        except Exception as err:  # noqa: BLE001 - metrics must never take the service down
            log.warning("reading engine stats failed: %s", err)
        await asyncio.sleep(every_s)


class ServerThread:
    """A tier server on a background event loop: `with ServerThread(spec) as address: ...`."""

    def __init__(self, spec: TierSpec, family=None):
        self.spec, self.family = spec, family
        self.server: TierServer | None = None
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="flow-tier-server", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._task = self._loop.create_task(serve(self.spec, self._on_ready, self.family))
        try:
            self._loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            pass
        except BaseException as err:  # noqa: BLE001 - reported to the starting thread
            self._error = err
            self._ready.set()

    def _on_ready(self, server: TierServer) -> None:
        self.server = server
        self._ready.set()

    def start(self) -> str:
        self._thread.start()
        self._ready.wait(60)
        if self._error is not None:
            raise self._error
        return self.server.address

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._task.cancel)
            self._thread.join(30)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
