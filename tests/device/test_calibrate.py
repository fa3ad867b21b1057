"""`flow calibrate`: thresholds that reach a target agreement, and the SDK picking them up."""

import json

import numpy as np
import pytest

from flow.calibration import choose_threshold


def test_threshold_is_the_lowest_that_keeps_the_target():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
    agrees = np.array([1, 1, 0, 1, 1, 0, 0, 1, 0, 0], bool)
    # accepting the top k positions costs the disagreements among them
    chosen = choose_threshold(scores, agrees, target=0.9)
    assert chosen.threshold == 0.5 and chosen.device_share == 0.5 and chosen.agreement == 0.9
    chosen = choose_threshold(scores, agrees, target=0.8)
    assert chosen.threshold == 0.4 and chosen.device_share == 0.6  # 2 errors in the top 6
    everything = choose_threshold(scores, agrees, target=0.5)
    assert everything.device_share == 1.0 and everything.threshold == 0.05
    nothing = choose_threshold(scores, np.zeros(10, bool), target=0.95)
    assert nothing.device_share == 0 and nothing.threshold > 0.9


def test_tied_scores_are_accepted_or_escalated_together():
    scores = np.array([0.9, 0.7, 0.7, 0.7, 0.1])
    agrees = np.array([1, 1, 0, 1, 1], bool)
    chosen = choose_threshold(scores, agrees, target=0.9)
    assert chosen.threshold == 0.9 and chosen.device_share == 0.2  # cannot take half of the 0.7s


@pytest.fixture(scope="module")
def heldout(device_family, tmp_path_factory):
    from flow.data.corpus import build_corpus
    from flow.data.tokens import tokenize_corpus

    corpus = tmp_path_factory.mktemp("calibration-corpus")
    build_corpus(corpus, val_fraction=0.1, max_bytes=300_000, heldout_bytes=40_000, progress=False)
    tokenize_corpus(corpus, device_family[0] / "tokenizer.json", progress=False)
    return corpus


def test_calibrate_command_writes_thresholds_the_sdk_uses(device_family, heldout, tier):
    from device import DeviceClient
    from runs import flow

    family_dir, family = device_family
    out = flow("calibrate", family_dir, "--exit", "0", "--data", heldout, "--target", "0.9",
               "--tokens", "2048", "--window", "64")
    assert "max_prob" in out.stdout and "calibration.json" in out.stdout
    path = family_dir / "members" / "0" / "calibration.json"
    calibration = json.loads(path.read_text())
    try:
        assert calibration["family_hash"] == family.family_hash() and calibration["positions"] == 2048
        for policy in ("max_prob", "margin", "entropy"):
            stats = calibration["policies"][policy]
            assert stats["agreement"] >= 0.9
            assert stats["device_share"] >= calibration["member_top1_agreement"] - 0.1 - 1e-9
        client = DeviceClient(family_dir, exit=0, cloud=tier, mode="exit", policy="margin")
        assert client.threshold == calibration["thresholds"]["margin"]
    finally:
        path.unlink()  # other tests expect the default thresholds


def test_calibrate_refuses_the_full_model(device_family, heldout):
    from runs import flow

    out = flow("calibrate", device_family[0], "--exit", "2", "--data", heldout, check=False)
    assert out.returncode == 1 and "full model" in out.stderr
