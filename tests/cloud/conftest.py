"""What the cloud tests share: the family the engine tests run (its heads sharpened, so that greedy
tokens are clear of near ties)."""

import pytest

from builders import sharpen_heads, tiny_config
from flow import Family


@pytest.fixture(scope="module")
def family() -> Family:
    return sharpen_heads(Family.random(tiny_config(head_dim=16, max_seq_len=96), seed=5))
