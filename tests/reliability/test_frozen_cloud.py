"""A `cloud`-mode device whose tier freezes: it falls back to its member after one message
deadline, not after a deadline that grows with the generation's length."""

import signal
import time

from device import DeviceClient
from flow.tier_client import GrpcTier
from greedy import greedy
from runs import start_flow_serve

PROMPT = [17, 3, 250, 9]


def test_a_frozen_tier_costs_a_cloud_mode_client_one_message_deadline(device_family):
    """Catches: a `cloud`-mode stream waiting out a deadline of timeout × max_new_tokens (here
    80 s) while its tier is frozen, instead of going on with the member after `timeout`."""
    family_dir, family = device_family
    process, address = start_flow_serve(family_dir)
    try:
        process.send_signal(signal.SIGSTOP)
        client = DeviceClient(family_dir, exit=0, cloud=GrpcTier(address, timeout=2.0), mode="cloud")
        began = time.monotonic()
        result = client.complete(PROMPT, max_new_tokens=40, ignore_eos=True)
        elapsed = time.monotonic() - began
    finally:
        process.send_signal(signal.SIGCONT)
        process.kill()
        process.wait(10)
    assert elapsed < 10, elapsed
    assert all(result.offline) and result.tokens == greedy(family, 0, PROMPT, 40)
