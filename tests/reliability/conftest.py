"""What the reliability tests share: engine worker pools (`MultiprocessEngineClient` with real
worker processes) driven from the test thread through an event loop on a background thread."""

from __future__ import annotations

import asyncio
import threading

import pytest

from builders import Reference
from cloud.engine import EngineConfig
from cloud.engine.multiprocess import MultiprocessEngineClient

OWNER = "owner-of-the-test-sessions"


class Pool:
    """A started `MultiprocessEngineClient` with `workers` local worker processes; its coroutines
    run on an event loop of a background thread (`run`, `submit`)."""

    def __init__(self, device_family, workers: int, endpoint: str, worker_key=None,
                 config: EngineConfig | None = None):
        family_dir, family = device_family
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.client = MultiprocessEngineClient(endpoint, family.family_hash(),
                                               config or EngineConfig(),
                                               family_dir, local_workers=workers,
                                               worker_key=worker_key)
        self.endpoint = endpoint
        self.run(self.client.start(), timeout=180)

    def submit(self, coroutine):
        """A `concurrent.futures.Future` of `coroutine` run on the pool's loop."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def run(self, coroutine, timeout: float = 20.0):
        return self.submit(coroutine).result(timeout)

    def pids(self) -> list[int]:
        return [worker.pid for worker in self.client.workers.values()]

    def check_every_worker_answers(self, reference: Reference) -> None:
        """One session per worker (so every worker serves one), each answering the reference
        rows with the full model's tokens exactly."""
        self.run(self._check_every_worker_answers(reference))

    async def _check_every_worker_answers(self, reference: Reference) -> None:
        client = self.client
        sessions = [(await client.open_session(OWNER, 0))[0] for _ in client.workers]
        try:
            assert {client.placement[s] for s in sessions} == set(client.workers)
            answers = await asyncio.gather(*(
                client.continue_(s, OWNER, 0, reference.rows, return_all=True, top_k=0,
                                 rollback=False) for s in sessions))
            for answer in answers:
                assert answer.tokens == reference.tokens
                assert answer.frontier == len(reference.tokens)
        finally:
            for session_id in sessions:
                await client.close(session_id, OWNER)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        try:
            self.run(self.client.stop(), timeout=60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)


@pytest.fixture(scope="module")
def pools(device_family, tmp_path_factory):
    """`pools(workers, endpoint=None, worker_key=None, config=None)`: a new started `Pool` (its
    endpoint by default an ipc:// socket in a temporary directory); every pool is stopped when
    the module's tests are done."""
    started: list[Pool] = []

    def start(workers: int, endpoint: str | None = None, worker_key=None,
              config: EngineConfig | None = None) -> Pool:
        endpoint = endpoint or f"ipc://{tmp_path_factory.mktemp('pool')}/engine.sock"
        started.append(Pool(device_family, workers, endpoint, worker_key, config))
        return started[-1]

    yield start
    for pool in started:
        pool.stop()
