"""The in-process next tier the device tests talk to (the family is in tests/conftest.py)."""

import pytest

from flow.reference_tier import ReferenceTier


@pytest.fixture
def tier(device_family) -> ReferenceTier:
    return ReferenceTier(device_family[1])
