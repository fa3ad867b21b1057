"""What one caller can take from others, and what the tier keeps for sessions nobody closes:
an identity at its session cap makes room from its own sessions only, and the per-session state
beside an engine (a worker pool's placement table, an edge's forwarded rows and its sessions on
the next tier) goes when the engine evicts or expires the session."""

import time

import pytest

from cloud.engine import EngineConfig, EngineLimits
from cloud.engine.core import Engine
from cloud.server import ServerConfig
from cloud.service import ServerThread, TierSpec
from flow.errors import ConfigError
from flow.tier import Exhausted, SessionLost
from flow.tier_client import GrpcTier

GREEDY_TOKEN, VICTIM_TOKEN = "token-of-the-greedy-caller", "token-of-the-victim"


@pytest.mark.parametrize("workers", [0, 1])
def test_an_identity_at_its_cap_evicts_its_own_sessions_only(device_family, reference, workers):
    """Catches: one identity opening session after session and evicting everyone else's idle
    sessions (4 slots: without the cap the victim's session is the least recently used one by the
    greedy caller's sixth)."""
    family_dir, family = device_family
    limits = EngineLimits(max_sessions=4, max_sessions_per_identity=2)
    server = ServerConfig(port=0, tokens=(GREEDY_TOKEN, VICTIM_TOKEN))
    with ServerThread(TierSpec(family_dir, 0, limits, server, workers=workers), family) as address:
        greedy, victim = GrpcTier(address, token=GREEDY_TOKEN), GrpcTier(address, token=VICTIM_TOKEN)
        try:
            kept = victim.open(family.family_hash(), 0)
            assert kept.continue_(0, reference.rows[:8], return_all=True).tokens == reference.tokens[:8]
            opened = []
            for _ in range(6):
                session = greedy.open(family.family_hash(), 0)
                session.continue_(0, reference.rows[:4], return_all=True)
                opened.append(session)
            with pytest.raises(SessionLost):  # the greedy caller's oldest made room
                opened[0].continue_(4, reference.rows[4:8])
            answer = kept.continue_(8, reference.rows[8:], return_all=True)
            assert answer.tokens == reference.tokens[8:] and answer.frontier == 16
            newest = opened[-1].continue_(4, reference.rows[4:8], return_all=True)
            assert newest.tokens == reference.tokens[4:8]
        finally:
            greedy.close()
            victim.close()


def test_an_identity_whose_sessions_are_all_busy_is_refused_not_served_from_others(device_family,
                                                                                     reference):
    _, family = device_family
    engine = Engine(family, limits=EngineLimits(max_sessions=4, max_sessions_per_identity=2))
    busy = [engine.open_session("greedy", 0)[0] for _ in range(2)]
    for session_id in busy:  # queued, not stepped: both sessions have a request in progress
        engine.submit_continue(session_id, "greedy", 0, reference.rows[:4])
    with pytest.raises(Exhausted, match="--max-sessions-per-identity"):
        engine.open_session("greedy", 0)
    engine.open_session("someone else", 0)  # two slots are still free for everyone else
    assert engine.ended_sessions() == []  # nobody was evicted


def test_a_cap_beyond_the_slots_is_a_config_error():
    with pytest.raises(ConfigError, match="max_sessions_per_identity"):
        EngineLimits(max_sessions=4, max_sessions_per_identity=5)


def test_a_worker_pool_forgets_the_placement_of_evicted_and_expired_sessions(pools, reference):
    """Catches: the placement table (and each worker's session count, which placement balances
    on) growing by one entry per session ever opened."""
    config = EngineConfig(EngineLimits(max_sessions=2, session_ttl_s=1.0))
    pool = pools(1, config=config)
    client = pool.client

    async def open_many(count):
        return [(await client.open_session("owner", 0))[0] for _ in range(count)]

    opened = pool.run(open_many(5))
    (worker,) = client.workers.values()
    assert set(client.placement) == set(opened[-2:]) == worker.sessions  # 3 evicted, forgotten
    assert set(pool.run(client.ended_sessions())) == set(opened[:3])
    deadline = time.monotonic() + 10  # the worker expires the idle two; its heartbeat says so
    while client.placement and time.monotonic() < deadline:
        time.sleep(0.2)
    assert client.placement == {} and worker.sessions == set()
    pool.check_every_worker_answers(reference)  # and it still serves


def test_an_edge_drops_the_state_of_sessions_its_engine_evicted(device_family, reference):
    """Catches: an edge keeping each abandoned session's rows, and its session on the cloud, for
    ever (it grew by ~780 kB per abandoned session)."""
    family_dir, family = device_family
    cloud_thread = ServerThread(TierSpec(family_dir, 1, None, ServerConfig(port=0)), family)
    with cloud_thread as cloud_address:
        edge_spec = TierSpec(family_dir, 0, EngineLimits(max_sessions=2), ServerConfig(port=0),
                             to_exit=1, threshold=1.5, next_address=cloud_address)
        edge_thread = ServerThread(edge_spec, family)
        with edge_thread as edge_address:
            device = GrpcTier(edge_address)
            try:
                for _ in range(5):  # abandoned after one forwarded request each
                    session = device.open(family.family_hash(), 0)
                    answer = session.continue_(0, reference.rows[:8])
                    assert answer.tokens == reference.tokens[7:8]  # the cloud's token
                edge = edge_thread.server.service.engine
                assert len(edge._escalations) == 2  # the sessions its engine still holds
                cloud = cloud_thread.server.service.engine.engine
                assert len(cloud.pool.sessions) == 2  # the others' sessions there were closed
            finally:
                device.close()
