"""A device reaches its tier over the slowest link profile: a connection that needs more than a
round trip to set up (TCP, then HTTP/2's settings exchange) is given the time it needs."""

import time

from cloud.server_config import ServerConfig
from cloud.service import ServerThread, TierSpec
from flow.link import PROFILES, LinkShaper
from flow.tier_client import GrpcTier


def test_fresh_channels_connect_over_a_link_whose_handshake_takes_a_second(device_family):
    """Catches: a connect deadline shorter than the link's setup time (gRPC takes its minimum
    connect timeout from `grpc.min_reconnect_backoff_ms`): every attempt times out, and a device
    stays offline on a slow link that works."""
    family_dir, family = device_family
    profile = PROFILES["bad"]  # 400 ms round trip, 100 ms jitter, 3 % loss
    with ServerThread(TierSpec(family_dir, 0, None, ServerConfig(port=0)), family) as address:
        host, port = address.rsplit(":", 1)
        with LinkShaper((host, int(port)), profile, seed=1) as link:
            for _ in range(3):  # a new channel each time: each pays the whole setup
                tier = GrpcTier(link.address, timeout=30.0)
                began = time.monotonic()
                try:
                    session = tier.open(family.family_hash(), 0)
                    session.close()
                finally:
                    tier.close()
                assert time.monotonic() - began > profile.rtt_ms / 1000  # it did cross the link
