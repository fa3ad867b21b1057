"""The same service with its engine in worker processes behind ZeroMQ, and under concurrency."""

import asyncio
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from cloud.engine import EngineConfig, EngineLimits
from cloud.engine.multiprocess import MultiprocessEngineClient
from cloud.server import ServerConfig
from cloud.service import ServerThread, TierSpec
from device import DeviceClient
from flow.tier import TierUnavailable
from flow.tier_client import GrpcTier
from greedy import check_drafts_were_accepted_and_rejected, check_same_greedy, check_speculative

PROMPTS = [[17, 3, 250, 9], [5], [100, 101, 102, 103, 104, 105, 106, 107], [42, 7, 42, 7, 42]]
DRAFT_TOKENS = (1, 2, 3, 5, 8)


def serve(family_and_dir, workers: int) -> ServerThread:
    family_dir, family = family_and_dir
    spec = TierSpec(family_dir, 0, EngineLimits(max_sessions=40, max_rows_per_request=96),
                    ServerConfig(port=0), workers=workers)
    return ServerThread(spec, family)


@pytest.fixture(scope="module", params=[0, 2], ids=["in-process", "2-workers"])
def server(request, agreeing_family):
    thread = serve(agreeing_family, request.param)
    address = thread.start()
    yield thread, address
    thread.stop()


def test_32_concurrent_sessions_each_get_their_own_full_model_output(agreeing_family, server):
    """Catches: one session's rows, cache or rollback leaking into another's when catch-ups,
    single steps and verifications of every draft length share batches (in process and across
    worker processes), and speculative rounds that never accept or never reject a draft."""
    family_dir, family = agreeing_family
    _, address = server
    jobs = [(PROMPTS[i % 4] + [i + 1], ("exit", "speculative")[i % 2], DRAFT_TOKENS[(i // 2) % 5])
            for i in range(32)]
    start = threading.Barrier(32)

    def run(job):
        prompt, mode, draft = job
        client = DeviceClient(family_dir, exit=0, cloud=GrpcTier(address), mode=mode,
                              threshold=1.5, draft_tokens=draft, intra_op_threads=1)
        start.wait()  # all 32 sessions in flight together: catch-ups and single steps interleave
        return client.complete(prompt, max_new_tokens=16, ignore_eos=True)

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(run, jobs))
    near_ties, by_draft = [], {draft: [] for draft in DRAFT_TOKENS}
    for (prompt, mode, draft), result in zip(jobs, results, strict=True):
        assert not any(result.offline)
        if mode == "speculative":
            near_ties += check_speculative(family, prompt, result, 16)
            by_draft[draft].append(result)
        else:
            assert result.round_trips == 16
            near_ties += check_same_greedy(family, 2, prompt, result.tokens, 16)
    for results_of_draft in by_draft.values():
        check_drafts_were_accepted_and_rejected(results_of_draft)
    assert near_ties == []


def kill_when_in_flight(pool, identity: bytes, outcome: dict) -> None:
    """SIGKILL a stopped worker as soon as the front end has a call waiting on it."""
    worker = pool.workers[identity]
    deadline = time.monotonic() + 10
    while not worker.pending and time.monotonic() < deadline:
        time.sleep(0.005)
    outcome["in_flight"] = len(worker.pending)
    os.kill(worker.pid, signal.SIGKILL)


def test_a_worker_killed_mid_call_costs_only_a_replay_on_the_survivor(device_family):
    """Catches: a call in flight on a dying worker hanging or failing the generation, the device
    sent offline (UNAVAILABLE) although another worker could take the session, and a replay onto
    the survivor that is not exact.

    The worker holding the session is stopped (SIGSTOP) after 5 tokens, the device's next request
    waits on it, and the worker is killed while that call is in flight. The call fails NOT_FOUND
    (another worker is alive), so the device reopens its session on the survivor and replays at
    once: no token is offline, and every token is the full model's."""
    family_dir, family = device_family
    thread = serve(device_family, workers=2)
    address = thread.start()
    try:
        pool = thread.server.service.engine
        client = DeviceClient(family_dir, exit=0, cloud=GrpcTier(address, timeout=10), mode="exit",
                              threshold=1.5, retry_interval=0.0)
        steps, outcome, killer = [], {}, None
        for step in client.generate(PROMPTS[2], max_new_tokens=16, ignore_eos=True):
            steps.append(step)
            if len(steps) == 5:
                (identity,) = set(pool.placement.values())
                os.kill(pool.workers[identity].pid, signal.SIGSTOP)
                killer = threading.Thread(target=kill_when_in_flight, args=(pool, identity, outcome))
                killer.start()
        killer.join(10)
        assert outcome["in_flight"] == 1
        assert not any(s.offline for s in steps)
        assert len(pool.workers) == 1  # the survivor served the replay
        assert check_same_greedy(family, 2, PROMPTS[2], [s.token for s in steps], 16) == []
        assert {s.tier for s in steps} == {"cloud"}
    finally:
        thread.stop()


def test_a_worker_that_cannot_build_its_engine_says_why(device_family, tmp_path):
    """Catches: a front end that waits out its start timeout (or serves without the worker) when
    a worker cannot build its engine from the config it was sent, instead of naming why."""
    family_dir, family = device_family
    client = MultiprocessEngineClient(f"ipc://{tmp_path}/engine.sock", family.family_hash(),
                                      EngineConfig(policy="no-such-policy"), family_dir,
                                      local_workers=1)
    began = time.monotonic()
    with pytest.raises(TierUnavailable, match="no-such-policy"):
        asyncio.run(client.start())
    assert time.monotonic() - began < 60


def test_local_workers_share_the_cores_the_front_end_may_use(device_family):
    """Catches: worker threads sized from the host's core count where the front end may run on
    fewer (taskset, a container's cpuset): two threads on one core, each step waiting for the
    thread that lost its core."""
    family_dir, family = device_family
    allowed = os.sched_getaffinity(0)
    client = MultiprocessEngineClient(None, family.family_hash(), EngineConfig(), family_dir,
                                      local_workers=1)

    async def started_command() -> list[str]:
        await client.start()
        try:
            return client._processes[0].args
        finally:
            await client.stop()

    os.sched_setaffinity(0, {min(allowed)})  # the workers inherit it
    try:
        command = asyncio.run(started_command())
    finally:
        os.sched_setaffinity(0, allowed)
    assert command[command.index("--threads") + 1] == "1", command


def test_a_front_end_with_workers_does_not_load_the_weights(device_family, monkeypatch):
    """Catches: a front end that holds a copy of the weights its workers serve (SmolLM2: 0.9 GB
    in a process that never runs the model)."""
    from flow.family import Family

    family_dir, family = device_family

    def refuse(*args, **kwargs):
        raise AssertionError("the front end loaded the family's weights")

    monkeypatch.setattr(Family, "load", refuse)  # in this process; the workers are others
    spec = TierSpec(family_dir, 0, EngineLimits(max_sessions=4), ServerConfig(port=0), workers=1)
    with ServerThread(spec) as address:
        client = DeviceClient(family_dir, exit=0, cloud=address, mode="exit", threshold=1.5)
        result = client.complete(PROMPTS[0], max_new_tokens=6, ignore_eos=True)
    assert not any(result.offline)
    assert check_same_greedy(family, 2, PROMPTS[0], result.tokens, 6) == []
