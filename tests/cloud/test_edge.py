"""device → edge → cloud: an edge tier answers at its own exit or forwards, exactly."""

import pytest

from cloud.server import ServerConfig
from cloud.service import ServerThread, TierSpec
from device import DeviceClient
from flow.confidence import confidence
from greedy import check_drafts_were_accepted_and_rejected, check_same_greedy, check_speculative, greedy

PROMPTS = [[17, 3, 250, 9], [5], [100, 101, 102, 103, 104, 105, 106, 107], [42, 7, 42, 7, 42]]


@pytest.fixture(scope="module")
def cloud(device_family):
    family_dir, family = device_family
    with ServerThread(TierSpec(family_dir, 1, None, ServerConfig(port=0)), family) as address:
        yield address


@pytest.fixture(scope="module")
def agreeing_cloud(agreeing_family):
    family_dir, family = agreeing_family
    with ServerThread(TierSpec(family_dir, 1, None, ServerConfig(port=0)), family) as address:
        yield address


def edge(device_family, cloud, threshold, workers=0, policy="max_prob") -> ServerThread:
    family_dir, family = device_family
    spec = TierSpec(family_dir, 0, None, ServerConfig(port=0, name="edge"), to_exit=1,
                    next_address=cloud, threshold=threshold, policy=policy, workers=workers)
    return ServerThread(spec, family)


@pytest.mark.parametrize("workers", [0, 1], ids=["in-process", "1-worker"])
def test_speculative_through_an_edge_is_the_full_model(agreeing_family, agreeing_cloud, workers):
    """Catches: an edge that answers a verification with its own exit instead of forwarding it,
    forwards the wrong rows, or does not roll its cloud session back after a rejected draft —
    for every draft length, with drafts accepted and rejected."""
    family_dir, family = agreeing_family
    with edge(agreeing_family, agreeing_cloud, threshold=0.0, workers=workers) as address:
        near_ties = []
        for draft_tokens in (1, 2, 3, 5, 8):
            client = DeviceClient(family_dir, exit=0, cloud=address, mode="speculative",
                                  draft_tokens=draft_tokens)
            results = [client.complete(prompt, max_new_tokens=12, ignore_eos=True)
                       for prompt in PROMPTS]
            for prompt, result in zip(PROMPTS, results, strict=True):
                near_ties += check_speculative(family, prompt, result, 12)
                assert set(result.tiers) <= {"device", "cloud"}
            check_drafts_were_accepted_and_rejected(results)
        assert near_ties == []


@pytest.mark.parametrize("edge_threshold, exit, tier", [(1.5, 2, "cloud"), (-1.0, 1, "edge")],
                         ids=["edge-never-sure", "edge-always-sure"])
def test_exit_mode_extremes(device_family, cloud, edge_threshold, exit, tier):
    family_dir, family = device_family
    with edge(device_family, cloud, edge_threshold) as address:
        client = DeviceClient(family_dir, exit=0, cloud=address, mode="exit", threshold=1.5)
        near_ties = []
        for prompt in PROMPTS:
            result = client.complete(prompt, max_new_tokens=10, ignore_eos=True)
            assert set(result.tiers) == {tier}
            near_ties += check_same_greedy(family, exit, prompt, result.tokens, 10)
        assert near_ties == []


def test_mixed_edge_settles_exactly_its_confident_tokens(device_family, cloud):
    family_dir, family = device_family
    with edge(device_family, cloud, threshold=0.3, policy="margin") as address:
        client = DeviceClient(family_dir, exit=0, cloud=address, mode="exit", threshold=1.5)
        result = client.complete(PROMPTS[0], max_new_tokens=20, ignore_eos=True)
    assert 0 < result.tiers.count("edge") < 20, result.tiers
    sequence = PROMPTS[0] + result.tokens
    for i, tier in enumerate(result.tiers):
        context = sequence[:len(PROMPTS[0]) + i]
        edge_logits = family.logits(context, exit=1)[0, -1].numpy()
        sure = confidence(edge_logits, "margin") >= 0.3
        assert tier == ("edge" if sure else "cloud"), i
        assert result.tokens[i] == int(family.logits(context, exit=1 if sure else 2)[0, -1].argmax())


def test_edge_without_its_cloud_still_answers_exit_mode_with_its_own_exit(device_family):
    family_dir, family = device_family
    with edge(device_family, "127.0.0.1:9", threshold=1.5) as address:  # nothing listens on :9
        client = DeviceClient(family_dir, exit=0, cloud=address, mode="exit", threshold=1.5)
        result = client.complete(PROMPTS[1], max_new_tokens=6, ignore_eos=True)
        assert set(result.tiers) == {"edge"}
        assert result.tokens == greedy(family, 1, PROMPTS[1], 6)
        spec_client = DeviceClient(family_dir, exit=0, cloud=address, mode="speculative",
                                   retry_interval=60)
        result = spec_client.complete(PROMPTS[1], max_new_tokens=6, ignore_eos=True)
        # verification needs the full model: the device goes on alone with its own greedy tokens
        assert all(result.offline) and set(result.tiers) == {"device"}
        assert result.tokens == greedy(family, 0, PROMPTS[1], 6)


def test_a_whole_model_generation_through_an_edge_is_the_cloud_s(device_family, cloud):
    """Catches: an edge refusing `cloud` mode (its engine holds only its blocks) instead of
    passing the generation on to the tier that has them."""
    family_dir, family = device_family
    prompt = [17, 3, 250, 9]
    with edge(device_family, cloud, threshold=0.0) as address:
        client = DeviceClient(family_dir, exit=0, cloud=address, mode="cloud")
        result = client.complete(prompt, max_new_tokens=10, ignore_eos=True)
        stopped_early = client.generate(prompt, max_new_tokens=40, mode="cloud", ignore_eos=True)
        assert len([step for step, _ in zip(stopped_early, range(3), strict=False)]) == 3
    assert result.tokens == greedy(family, family.config.last_exit, prompt, 10)
    assert not any(result.offline)
