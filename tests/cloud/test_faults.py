"""Faults of a real tier seen by a device over gRPC: a `flow serve` process stopped (frozen),
killed, and restarted on the same port in the middle of a generation, and an answer lost on its
way back after the tier ran the request."""

import signal

import grpc
import pytest

from cloud.server import ServerConfig
from cloud.service import ServerThread, TierSpec
from device import DeviceClient
from device.client import CloudRequiredError
from faulty_tier import FaultyTier
from flow.tier_client import GrpcTier
from greedy import greedy
from runs import free_port, start_flow_serve

PROMPT = [17, 3, 250, 9]


def test_a_frozen_killed_and_restarted_tier_costs_offline_tokens_then_an_exact_replay(device_family):
    """Catches: a device that hangs or fails when its tier freezes or dies, an offline token
    that is not the member's own, and a replay after a restart that is not the full model's.

    Exit mode escalates every token. After token 3 the tier is frozen (SIGSTOP): calls time out,
    the device goes on with member 0. After token 5 it thaws (SIGCONT) and answers again. After
    token 9 it is killed (SIGKILL): connections are refused. After token 12 a new `flow serve`
    listens on the same port: the device's session is gone, it replays from position 0."""
    family_dir, family = device_family
    port = free_port()
    process, address = start_flow_serve(family_dir, port)
    tier = GrpcTier(address, timeout=1.0)
    client = DeviceClient(family_dir, exit=0, cloud=tier, mode="exit", threshold=1.5,
                          retry_interval=0.0)
    steps, processes = [], [process]
    try:
        for i, step in enumerate(client.generate(PROMPT, max_new_tokens=20, ignore_eos=True)):
            steps.append(step)
            if i == 3:
                process.send_signal(signal.SIGSTOP)
            elif i == 5:
                process.send_signal(signal.SIGCONT)
            elif i == 9:
                process.kill()
                process.wait(10)
            elif i == 12:
                process, _ = start_flow_serve(family_dir, port)
                processes.append(process)
                # the channel backs off after refused connections: wait until it reconnects
                grpc.channel_ready_future(tier.channel).result(timeout=30)
    finally:
        for p in processes:
            p.send_signal(signal.SIGCONT)
            p.kill()
            p.wait(10)
    offline = [s.offline for s in steps]
    assert offline == [False] * 4 + [True] * 2 + [False] * 4 + [True] * 3 + [False] * 7, offline
    sequence = PROMPT + [s.token for s in steps]
    for i, step in enumerate(steps):
        context = sequence[:len(PROMPT) + i]
        exit = 0 if step.offline else 2  # offline: member 0's token; online: the full model's
        assert step.token == int(family.logits(context, exit=exit)[0, -1].argmax()), i
        assert step.tier == ("device" if step.offline else "cloud"), i


def test_require_cloud_fails_fast_against_a_dead_tier_and_cloud_mode_falls_back(device_family):
    """Catches: `require_cloud` silently going offline, and `cloud` mode hanging or failing
    when its tier dies before the stream (it must go on with the member's own tokens)."""
    family_dir, family = device_family
    process, address = start_flow_serve(family_dir, free_port())
    process.kill()
    process.wait(10)
    strict = DeviceClient(family_dir, exit=0, cloud=GrpcTier(address, timeout=2), mode="exit",
                          threshold=1.5, require_cloud=True)
    with pytest.raises(CloudRequiredError, match="unreachable"):
        strict.complete(PROMPT, max_new_tokens=3, ignore_eos=True)
    fallback = DeviceClient(family_dir, exit=0, cloud=GrpcTier(address, timeout=2), mode="cloud")
    result = fallback.complete(PROMPT, max_new_tokens=5, ignore_eos=True)
    assert result.offline == [True] * 5 and result.tokens == greedy(family, 0, PROMPT, 5)


def test_an_answer_lost_after_the_tier_ran_it_costs_one_offline_token(device_family):
    """Catches: a device that does not adopt the frontier the tier reports (FAILED_PRECONDITION
    with `flow-frontier`) when the tier holds positions whose answer never arrived — it would
    stay offline — and a catch-up after it that is not exact.

    The tier (a real gRPC server) runs the request for token 4 but its answer is lost: token 4 is
    the member's own; the next request starts one position behind the tier's frontier, is refused
    with the tier's frontier, and is resent from there."""
    family_dir, family = device_family
    with ServerThread(TierSpec(family_dir, 0, None, ServerConfig(port=0)), family) as address:
        tier = FaultyTier(GrpcTier(address))
        client = DeviceClient(family_dir, exit=0, cloud=tier, mode="exit", threshold=1.5,
                              retry_interval=0.0)
        steps = []
        for i, step in enumerate(client.generate(PROMPT, max_new_tokens=10, ignore_eos=True)):
            steps.append(step)
            if i == 3:
                tier.lose_next_answer()
    assert [s.offline for s in steps] == [False] * 4 + [True] + [False] * 5
    sequence = PROMPT + [s.token for s in steps]
    for i, step in enumerate(steps):
        context = sequence[:len(PROMPT) + i]
        exit = 0 if step.offline else 2
        assert step.token == int(family.logits(context, exit=exit)[0, -1].argmax()), i
