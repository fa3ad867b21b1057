"""The engine clients keep one interface, and the engine's config reaches every worker whole."""

import argparse
import dataclasses
import inspect

import pytest

from cloud.cli import add_flags, from_flags
from cloud.edge import EdgeEngineClient
from cloud.engine import EngineConfig, EngineLimits
from cloud.engine.client import EngineClient
from cloud.engine.in_process import InProcessEngineClient
from cloud.engine.multiprocess import MultiprocessEngineClient
from flow.errors import ConfigError

CALLS = [name for name, call in vars(EngineClient).items()
         if callable(call) and not name.startswith("_")]


@pytest.mark.parametrize("client", [InProcessEngineClient, MultiprocessEngineClient, EdgeEngineClient])
def test_every_engine_client_answers_every_call_of_the_protocol(client):
    """Catches: a client with a call missing, its parameters named or ordered otherwise, or sync
    where the protocol awaits (the front end would fail only when that call comes)."""
    assert set(CALLS) == {"start", "stop", "open_session", "continue_", "rollback", "close",
                          "generate", "ended_sessions", "stats"}
    for name in CALLS:
        declared, implemented = getattr(EngineClient, name), getattr(client, name)
        assert list(inspect.signature(implemented).parameters) == \
            list(inspect.signature(declared).parameters), name
        assert inspect.iscoroutinefunction(implemented) == inspect.iscoroutinefunction(declared), name


def test_serve_flags_are_the_engine_limits_with_their_defaults():
    """Catches: a limit without its flag, a flag whose default is not the limit's, a value that
    lands in another field."""
    parser = argparse.ArgumentParser()
    add_flags(parser, EngineLimits)
    assert from_flags(EngineLimits, parser.parse_args([])) == EngineLimits()
    args = parser.parse_args(["--max-sessions", "3", "--max-rows", "5", "--max-batch-rows", "7",
                              "--session-ttl", "1.5", "--max-context", "11", "--max-top-k", "13",
                              "--max-sessions-per-identity", "2"])
    assert from_flags(EngineLimits, args) == EngineLimits(3, 5, 7, 1.5, 11, 13, 2)
    assert all("flag" in field.metadata for field in dataclasses.fields(EngineLimits))
    assert "(default 600)" in parser.format_help()


def test_an_engine_config_travels_whole_and_a_bad_one_is_named():
    config = EngineConfig(EngineLimits(max_sessions=3, session_ttl_s=2.5), to_exit=1, policy="margin")
    assert EngineConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="max_sessions"):
        EngineConfig.from_dict({**config.to_dict(), "limits": {"max_sessions": 0}})
    with pytest.raises(ConfigError, match="not an engine config"):
        EngineConfig.from_dict({"limits": {"slots": 3}, "to_exit": None, "policy": "max_prob"})


def test_one_engine_step_wakes_the_event_loop_once_for_all_its_answers(device_family, reference):
    """Catches: an answer handed to the event loop on its own (a wake-up per answer, each
    contending for the GIL with the step still producing the rest), or a second hop per request
    for its submission. Six sessions' requests, queued while the engine is busy, run in one step:
    their answers (the reference's tokens, each) reach the loop in one wake-up."""
    import asyncio
    import time

    from cloud.engine.core import Engine

    _, family = device_family
    client = InProcessEngineClient(Engine(family, limits=EngineLimits(max_sessions=6)))
    owner = "one-wake-up"

    async def scenario():
        await client.start()
        loop = asyncio.get_running_loop()
        wake_ups = []
        send = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *args: (wake_ups.append(args), send(*args))[1]
        try:
            sessions = [(await client.open_session(owner, 0))[0] for _ in range(6)]
            client.thread.post(lambda: time.sleep(0.3))  # busy: the requests queue up behind it
            answers = [asyncio.create_task(client.continue_(
                session, owner, 0, reference.rows, return_all=True, top_k=0, rollback=False))
                for session in sessions]
            await asyncio.sleep(0.1)
            wake_ups.clear()
            answers = await asyncio.gather(*answers)
            assert [a.tokens for a in answers] == [reference.tokens] * 6
            assert len(wake_ups) == 1, wake_ups
        finally:
            del loop.call_soon_threadsafe
            await client.stop()

    asyncio.run(scenario())
