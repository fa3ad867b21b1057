"""Shared fixtures: tiny families built on the spot (nothing is downloaded)."""

import pytest

from builders import tiny_config
from flow import Family


@pytest.fixture
def tiny_family() -> Family:
    return Family.random(tiny_config(), seed=0)
