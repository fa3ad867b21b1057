"""What the cloud tests share: the family the engine tests run (its heads sharpened, so that greedy
tokens are clear of near ties), and a served tier with its raw stub, over both engine clients."""

import grpc
import pytest
from served import TOKEN

from builders import sharpen_heads, tiny_config
from cloud.engine import EngineLimits
from cloud.server import ServerConfig
from cloud.service import ServerThread, TierSpec
from flow import Family
from flow.v1 import tier_pb2_grpc


@pytest.fixture(scope="module")
def family() -> Family:
    return sharpen_heads(Family.random(tiny_config(head_dim=16, max_seq_len=96), seed=5))


@pytest.fixture(scope="module", params=[0, 2], ids=["in-process", "2-workers"])
def workers(request) -> int:
    """Engine worker processes of every tier served here: 0 runs the engine in the server's
    process (`InProcessEngineClient`), 2 in worker processes (`MultiprocessEngineClient`)."""
    return request.param


@pytest.fixture(scope="module")
def server(device_family, workers):
    """A served family with authentication (`served.TOKEN`), at a free port."""
    family_dir, family = device_family
    spec = TierSpec(family_dir, 0, EngineLimits(max_sessions=8, max_rows_per_request=64),
                    ServerConfig(port=0, tokens=(TOKEN,)), workers=workers)
    with ServerThread(spec, family) as address:
        yield address


@pytest.fixture
def stub(server):
    channel = grpc.insecure_channel(server)
    stub = tier_pb2_grpc.TierStub(channel)
    stub.channel = channel
    yield stub
    channel.close()
