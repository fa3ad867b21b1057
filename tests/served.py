"""What tests of a served tier share: prompts, the bearer token the `server` fixture
(tests/cloud/conftest.py) accepts, and raw-stub helpers."""

import grpc

from flow.v1 import tier_pb2

PROMPTS = [[17, 3, 250, 9], [5], [100, 101, 102, 103, 104, 105, 106, 107], [42, 7, 42, 7, 42]]
TOKEN = "s3cret-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


def stub_channel(stub) -> grpc.Channel:
    return stub.channel


def open_session(stub, family, from_exit=0):
    return stub.OpenSession(tier_pb2.OpenSessionRequest(family_hash=family.family_hash(),
                                                        from_exit=from_exit), metadata=AUTH)
