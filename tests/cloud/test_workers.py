"""The same service with its engine in worker processes behind ZeroMQ, and under concurrency."""

import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from cloud.engine import EngineLimits
from cloud.server import ServerConfig
from cloud.service import ServerThread, TierSpec
from device import DeviceClient
from flow.tier_client import GrpcTier
from greedy import check_same_greedy

PROMPTS = [[17, 3, 250, 9], [5], [100, 101, 102, 103, 104, 105, 106, 107], [42, 7, 42, 7, 42]]


def serve(device_family, workers: int) -> ServerThread:
    family_dir, family = device_family
    spec = TierSpec(family_dir, 0, EngineLimits(max_sessions=40, max_rows_per_request=96),
                    ServerConfig(port=0), workers=workers)
    return ServerThread(spec, family)


@pytest.fixture(scope="module", params=[0, 2], ids=["in-process", "2-workers"])
def server(request, device_family):
    thread = serve(device_family, request.param)
    address = thread.start()
    yield thread, address
    thread.stop()


def test_32_concurrent_sessions_each_get_their_own_full_model_output(device_family, server):
    family_dir, family = device_family
    _, address = server
    jobs = [(PROMPTS[i % 4] + [i + 1], ("exit", "speculative")[i % 2], 1 + i % 5) for i in range(32)]
    start = threading.Barrier(32)

    def run(job):
        prompt, mode, draft = job
        client = DeviceClient(family_dir, exit=0, cloud=GrpcTier(address), mode=mode,
                              threshold=1.5, draft_tokens=draft, intra_op_threads=1)
        start.wait()  # all 32 sessions in flight together: catch-ups and single steps interleave
        return client.complete(prompt, max_new_tokens=10, ignore_eos=True)

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(run, jobs))
    near_ties = []
    for (prompt, _, _), result in zip(jobs, results, strict=True):
        assert not any(result.offline)
        check_same_greedy(family, 2, prompt, result.tokens, near_ties)
    print("near ties:", near_ties)


def test_a_killed_worker_costs_a_replay_not_the_output(device_family):
    family_dir, family = device_family
    thread = serve(device_family, workers=2)
    address = thread.start()
    try:
        pool = thread.server.service.engine
        client = DeviceClient(family_dir, exit=0, cloud=GrpcTier(address, timeout=10), mode="exit",
                              threshold=1.5, retry_interval=0.0)
        steps = []
        for step in client.generate(PROMPTS[2], max_new_tokens=16, ignore_eos=True):
            steps.append(step)
            if len(steps) == 5:
                (identity,) = set(pool.placement.values())
                os.kill(pool.workers[identity].pid, signal.SIGKILL)
        sequence = PROMPTS[2] + [s.token for s in steps]
        online = [i for i, s in enumerate(steps) if not s.offline]
        assert len(online) >= 12 and len(pool.workers) == 1  # the survivor served the replay
        for i in online:  # every token the cloud settled is the full model's next token
            context = sequence[:len(PROMPTS[2]) + i]
            assert steps[i].token == int(family.logits(context, exit=2)[0, -1].argmax()), i
    finally:
        thread.stop()
