"""A caller that gives up before the engine has taken its request leaves nothing behind: the
session takes its retry at once (a frozen and thawed tier made devices crash on "this session
already has a continue request in progress")."""

import asyncio
import time

from cloud.engine import EngineLimits
from cloud.engine.core import Engine
from cloud.engine.in_process import InProcessEngineClient
from flow.tier import SamplingParams

OWNER = "owner-of-the-cancelled-calls"


def test_a_request_cancelled_before_the_engine_took_it_is_withdrawn(device_family, reference):
    _, family = device_family
    client = InProcessEngineClient(Engine(family, limits=EngineLimits(max_sessions=2)))

    async def scenario():
        await client.start()
        try:
            session_id, _ = await client.open_session(OWNER, 0)
            client.thread.post(lambda: time.sleep(0.5))  # the engine is busy (frozen)
            gave_up = asyncio.create_task(client.continue_(
                session_id, OWNER, 0, reference.rows, return_all=True, top_k=0, rollback=False))
            await asyncio.sleep(0.1)
            gave_up.cancel()  # the device's deadline passed before the engine took the request
            retry = await client.continue_(session_id, OWNER, 0, reference.rows, return_all=True,
                                           top_k=0, rollback=False)
            assert retry.tokens == reference.tokens and retry.frontier == len(reference.tokens)
            # a generation given up on the same way gives its slot back: both slots open again
            client.thread.post(lambda: time.sleep(0.5))
            stream = client.generate(OWNER, [1, 2, 3], 50, SamplingParams(), ())
            waiting = asyncio.create_task(stream.__anext__())
            await asyncio.sleep(0.1)
            waiting.cancel()
            await asyncio.sleep(0.6)
            stats = await client.stats()
            assert stats["generations"] == 0 and stats["queued_work"] == 0, stats
        finally:
            await client.stop()

    asyncio.run(scenario())
