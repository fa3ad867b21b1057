"""Putting a tier together: family -> engine -> engine client (-> an edge's) -> gRPC server,
and running it.

`serve(...)` serves until SIGINT/SIGTERM (what `flow serve` calls); `ServerThread` runs the same
server on a background event loop in this process, for tests, benchmarks and the demo.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

from cloud.engine.client import EngineClient
from cloud.engine.config import EngineConfig, EngineLimits
from cloud.metrics import TierMetrics
from cloud.server import TierServer, TierService
from cloud.server_config import ServerConfig
from flow.confidence import DEFAULT_POLICY

log = logging.getLogger("flow.cloud")


@dataclass
class TierSpec:
    """What a tier serves: a family, from which exit, with which engine limits."""

    family_dir: Path
    from_exit: int
    limits: EngineLimits | None = None  # None = defaults
    server: ServerConfig = field(default_factory=ServerConfig)
    workers: int = 0  # engine worker processes to spawn; 0 = the engine runs in this process
    endpoint: str | None = None  # ROUTER endpoint for workers (default: a private ipc:// path)
    worker_key: Path | None = None  # the workers' key file (default: a fresh key, local workers only)
    metrics_port: int | None = None  # serve Prometheus /metrics here (0 = any free port)
    # An edge tier: answer at exit `to_exit` when its `policy` passes `threshold` (None: the
    # policy's default), else forward to the tier at `next_address` (a `flow.tier.NextTier`
    # object works too, for tests).
    to_exit: int | None = None
    next_address: object = None
    policy: str = DEFAULT_POLICY
    threshold: float | None = None
    next_token: str | None = None


def build(spec: TierSpec, family=None,
          engine: EngineClient | None = None) -> tuple[TierServer, EngineClient]:
    """The server and its engine client for `spec` (neither started): the engine in this process
    or in worker processes, wrapped by an edge's forwarding when the tier stops before the full
    model. `engine` serves instead when given (a benchmark's or a test's engine client). With
    workers and no `family` given, this process reads the family's manifest (and checks its
    weights file against it) but does not load the weights: only the workers hold them."""
    from flow.errors import ConfigError

    if family is None and (spec.workers or spec.endpoint):
        from flow.artifact import read_manifest

        manifest = read_manifest(spec.family_dir)
        config, family_hash = manifest.config, manifest.family_hash
    else:
        from flow.family import Family

        family = family or Family.load(spec.family_dir)
        config, family_hash = family.config, family.family_hash()
    config.check_exit(spec.from_exit)
    if spec.to_exit is not None:
        config.check_exit(spec.to_exit)  # here, not first in a worker process
    if spec.from_exit == config.last_exit:
        raise ConfigError(f"--from-exit {spec.from_exit} is the full model: nothing is left to serve "
                          f"after it; choose one of 0..{config.num_exits - 2}")
    if spec.to_exit is not None and spec.to_exit <= spec.from_exit:
        raise ConfigError(f"--to-exit {spec.to_exit} must come after --from-exit {spec.from_exit}: "
                          f"an edge answers at a deeper exit than the devices it serves")
    if spec.workers < 0:
        raise ConfigError(f"--workers must be >= 0 (0 runs the engine in this process), got "
                          f"{spec.workers}")
    if spec.endpoint is not None and not spec.endpoint.startswith(("ipc://", "tcp://")):
        raise ConfigError(f"--bind {spec.endpoint!r} is not a ZeroMQ endpoint: use ipc://PATH or "
                          f"tcp://HOST:PORT")
    limits = spec.limits or EngineLimits()
    metrics = TierMetrics()
    edge = spec.to_exit is not None and spec.to_exit != config.last_exit
    if edge and spec.next_address is None:
        raise ConfigError(f"--to-exit {spec.to_exit} stops before the full model: give --next "
                          f"HOST:PORT of the tier to forward to")
    engine_config = EngineConfig(limits, to_exit=spec.to_exit if edge else None, policy=spec.policy)
    if engine is None:
        engine = _engine_client(spec, family, family_hash, engine_config, metrics)
    if edge:
        from cloud.edge import EdgeEngineClient
        from flow.confidence import ExitPolicy
        from flow.tier_client import GrpcTier

        next_tier = spec.next_address
        if isinstance(next_tier, str):
            # a call per request: an open stream holds one of gRPC's threads, and an edge
            # forwards many devices' sessions at once
            next_tier = GrpcTier(next_tier, token=spec.next_token, streaming=False)
        engine = EdgeEngineClient(engine, next_tier, ExitPolicy(spec.policy, spec.threshold),
                                  family_hash, spec.to_exit, config.hidden_size,
                                  config.max_seq_len)
    server = spec.server
    if server.max_receive_bytes is None:
        server = dataclasses.replace(server, max_receive_bytes=largest_request_bytes(limits, config))
    service = TierService(engine, family_hash, config.vocab_size, server,
                          max_rows=limits.max_rows_per_request, metrics=metrics)
    return TierServer(service, server), engine


def _engine_client(spec: TierSpec, family, family_hash: str, engine_config: EngineConfig,
                   metrics: TierMetrics) -> EngineClient:
    """The engine of `spec`: in worker processes (`family` may be None then), or on a thread of
    this process."""
    if spec.workers or spec.endpoint:
        from cloud.engine.keys import WorkerKey
        from cloud.engine.multiprocess import MultiprocessEngineClient

        worker_key = WorkerKey.load(spec.worker_key) if spec.worker_key is not None else None
        return MultiprocessEngineClient(spec.endpoint, family_hash, engine_config,
                                        spec.family_dir, spec.workers,
                                        on_step=metrics.observe_step, worker_key=worker_key)
    from cloud.engine.core import Engine
    from cloud.engine.in_process import InProcessEngineClient

    return InProcessEngineClient(Engine.from_config(family, engine_config),
                                 on_step=metrics.observe_step)


def largest_request_bytes(limits: EngineLimits, config) -> int:
    """The largest request a tier of these limits takes for a family of `config`: a Continue of
    `max_rows_per_request` fp32 rows (the widest codec), or a Generate whose prompt and stop ids
    fill the context; anything larger is refused before it is read."""
    rows = limits.max_rows_per_request * config.hidden_size * 4
    token_ids = 2 * min(limits.max_context, config.max_seq_len) * 5  # prompt + stop ids, varints
    return max(rows, token_ids) + (64 << 10)  # ids, shapes, sampling parameters


async def serve(spec: TierSpec, ready=None, family=None, engine: EngineClient | None = None) -> None:
    """Serve until cancelled or signalled; `ready(server)` is called once it listens. Whatever
    started is stopped again if a later part cannot start (a port in use, a worker that fails)."""
    server, engine = build(spec, family, engine)
    metrics = server.service.metrics
    http = metrics.serve_http(spec.metrics_port, spec.server.host) if spec.metrics_port is not None \
        else None  # first: a metrics port in use fails before any worker is spawned
    server.metrics_port = http.server_port if http is not None else None
    poller = None
    try:
        await engine.start()
        await server.start()
        poller = asyncio.create_task(_poll_stats(engine, metrics, server))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
        if ready is not None:
            ready(server)
        await stop.wait()
    finally:
        if poller is not None:
            poller.cancel()
        await server.stop()
        await engine.stop()
        if http is not None:
            http.shutdown()


async def _poll_stats(engine, metrics, server: TierServer, every_s: float = 1.0) -> None:
    """Keep the metrics' engine snapshot fresh (read at scrape time), and health true to it: a
    tier whose engine workers are all gone is NOT_SERVING until one joins again."""
    while True:
        try:
            stats = await engine.stats()
            metrics.engine.snapshot = stats
            await server.set_serving(stats.get("workers", 1) > 0)
        except Exception as err:  # noqa: BLE001 - metrics must never take the service down
            log.warning("reading engine stats failed: %s", err)
        await asyncio.sleep(every_s)


class ServerThread:
    """A tier server on a background event loop: `with ServerThread(spec) as address: ...`."""

    def __init__(self, spec: TierSpec, family=None, engine: EngineClient | None = None):
        self.spec, self.family, self.engine = spec, family, engine
        self.server: TierServer | None = None
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="flow-tier-server", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._task = self._loop.create_task(serve(self.spec, self._on_ready, self.family, self.engine))
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
