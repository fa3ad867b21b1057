"""A session belongs to the bearer token that opened it: another identity continuing, rolling
back or closing it is refused or ignored, and the owner's session goes on exactly as before, in
every engine mode (in process, in worker processes, behind an edge)."""

import pytest

from cloud.server import ServerConfig
from cloud.service import ServerThread, TierSpec
from flow.tier import SessionLost
from flow.tier_client import GrpcSession, GrpcTier

OWNER_TOKEN, INTRUDER_TOKEN = "token-of-the-owner", "token-of-the-intruder"


@pytest.fixture(scope="module")
def cloud_behind_the_edge(device_family):
    family_dir, family = device_family
    with ServerThread(TierSpec(family_dir, 1, None, ServerConfig(port=0)), family) as address:
        yield address


@pytest.fixture(params=["in-process", "workers", "edge"])
def tier(request, device_family):
    """The address of a tier that accepts both tokens, its engine run as `request.param` says
    (the edge forwards every verification to a cloud behind it)."""
    family_dir, family = device_family
    server = ServerConfig(port=0, tokens=(OWNER_TOKEN, INTRUDER_TOKEN))
    if request.param == "edge":
        spec = TierSpec(family_dir, 0, None, server, to_exit=1, threshold=1.5,
                        next_address=request.getfixturevalue("cloud_behind_the_edge"))
    else:
        spec = TierSpec(family_dir, 0, None, server, workers=int(request.param == "workers"))
    with ServerThread(spec, family) as address:
        yield address


def test_another_identity_touching_a_session_changes_nothing(device_family, tier, reference):
    """Catches: an intruder's CloseSession (or refused Continue) of someone else's session id
    making the tier forget the owner's state: a worker pool dropping the session's placement (the
    owner's next request NOT_FOUND), an edge dropping the rows it forwarded to the cloud (the
    owner's next tokens silently wrong)."""
    _, family = device_family
    owner, intruder = GrpcTier(tier, token=OWNER_TOKEN), GrpcTier(tier, token=INTRUDER_TOKEN)
    try:
        session = owner.open(family.family_hash(), 0)
        first = session.continue_(0, reference.rows[:8], return_all=True)
        assert first.tokens == reference.tokens[:8]

        stolen = GrpcSession(intruder, session.session_id, 8, "fp32")
        with pytest.raises(SessionLost):  # to the intruder the session reads as unknown
            stolen.continue_(8, reference.rows[8:], return_all=True)
        with pytest.raises(SessionLost):
            stolen.rollback(0)
        stolen.close()  # answered OK, as for any unknown session, and ignored

        second = session.continue_(8, reference.rows[8:], return_all=True)
        assert second.tokens == reference.tokens[8:]
        assert second.frontier == 16
        session.close()
    finally:
        owner.close()
        intruder.close()
