"""A tier that freezes costs its caller one message deadline: a `cloud`-mode device falls back to
its member after it, not after a deadline that grows with the generation's length, and a Generate
waiting for its next token or a request on a session's open `ContinueStream` fails after it."""

import re
import signal
import time
from contextlib import closing, contextmanager

import pytest

from device import DeviceClient
from flow.tier import TierUnavailable
from flow.tier_client import GrpcTier
from greedy import greedy
from runs import start_flow_serve

PROMPT = [17, 3, 250, 9]


@contextmanager
def freezable_server(family_dir):
    """A `flow serve` process a test may freeze (SIGSTOP): (process, address); woken and killed
    at the end, whatever happened."""
    process, address = start_flow_serve(family_dir)
    try:
        yield process, address
    finally:
        process.send_signal(signal.SIGCONT)
        process.kill()
        process.wait(10)


def test_a_frozen_tier_costs_a_cloud_mode_client_one_message_deadline(device_family):
    """Catches: a `cloud`-mode stream waiting out a deadline of timeout × max_new_tokens (here
    80 s) while its tier is frozen, instead of going on with the member after `timeout`."""
    family_dir, family = device_family
    with freezable_server(family_dir) as (process, address):
        process.send_signal(signal.SIGSTOP)
        client = DeviceClient(family_dir, exit=0, cloud=GrpcTier(address, timeout=2.0), mode="cloud")
        began = time.monotonic()
        result = client.complete(PROMPT, max_new_tokens=40, ignore_eos=True)
        elapsed = time.monotonic() - began
    assert elapsed < 10, elapsed
    assert all(result.offline) and result.tokens == greedy(family, 0, PROMPT, 40)


def test_a_frozen_tier_costs_a_generate_one_token_deadline(device_family):
    """Catches: a Generate waiting for its next token for as long as the tier is frozen (gRPC's
    stream iterator has no deadline per message), or giving up before its deadline."""
    family_dir, family = device_family
    with freezable_server(family_dir) as (process, address), \
            closing(GrpcTier(address, timeout=2.0)) as tier:
        served = list(tier.generate(PROMPT, 3, family_hash=family.family_hash()))  # connected
        process.send_signal(signal.SIGSTOP)
        began = time.monotonic()
        with pytest.raises(TierUnavailable, match=re.escape(f"no token from {address} for 2 s")):
            list(tier.generate(PROMPT, 40, family_hash=family.family_hash()))
        elapsed = time.monotonic() - began
        process.send_signal(signal.SIGCONT)
    assert 2 <= elapsed < 5, elapsed
    assert served == greedy(family, family.config.last_exit, PROMPT, 3)


def test_a_frozen_tier_costs_a_request_on_an_open_stream_one_deadline(device_family):
    """Catches: a request on a session's open `ContinueStream` waiting for its answer for as
    long as the tier is frozen (gRPC's stream iterator has no deadline per message)."""
    family_dir, family = device_family
    rows = family.handoff(PROMPT, exit=0)[0].numpy()
    with freezable_server(family_dir) as (process, address), \
            closing(GrpcTier(address, timeout=2.0)) as tier:
        session = tier.open(family.family_hash(), 0)
        session.continue_(0, rows[:2])  # the stream is open
        process.send_signal(signal.SIGSTOP)
        began = time.monotonic()
        with pytest.raises(TierUnavailable, match="no answer"):
            session.continue_(2, rows[2:3])
        elapsed = time.monotonic() - began
        process.send_signal(signal.SIGCONT)
        # the session goes on, on a new stream (rolled back: the tier may have served the
        # request it read on waking before it read the cancellation)
        answer = session.continue_(2, rows[2:], rollback=True)
    assert 2 <= elapsed < 4, elapsed
    assert answer.tokens == greedy(family, 2, PROMPT, 1)
