"""The in-process next tier the device tests talk to (the family is in tests/conftest.py)."""

import pytest

from faulty_tier import FaultyTier
from flow.reference_tier import ReferenceTier


@pytest.fixture
def tier(device_family) -> FaultyTier:
    """The reference model as the next tier, with faults to switch on."""
    return FaultyTier(ReferenceTier(device_family[1]))


@pytest.fixture(params=["reference", "grpc"])
def any_tier(request, device_family):
    """The next tier in process, then a real `flow serve` engine behind gRPC, with faults to
    switch on: what the offline and replay tests run against."""
    if request.param == "reference":
        yield FaultyTier(ReferenceTier(device_family[1]))
        return
    from cloud.server_config import ServerConfig
    from cloud.service import ServerThread, TierSpec
    from flow.tier_client import GrpcTier

    spec = TierSpec(device_family[0], 0, None, ServerConfig(port=0))
    with ServerThread(spec, device_family[1]) as address:
        tier = GrpcTier(address)
        yield FaultyTier(tier)
        tier.close()
