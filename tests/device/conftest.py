"""The in-process next tier the device tests talk to (the family is in tests/conftest.py)."""

import pytest

from faulty_tier import FaultyTier
from flow.reference_tier import ReferenceTier


@pytest.fixture
def tier(device_family) -> FaultyTier:
    """The reference model as the next tier, with faults to switch on."""
    return FaultyTier(ReferenceTier(device_family[1]))
