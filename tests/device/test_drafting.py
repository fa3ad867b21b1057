"""Adaptive speculative drafts: exact like every draft length, longer where a round trip is dear,
and sized by estimates that converge on what they measure."""

import numpy as np
import pytest

from device import DeviceClient
from device.drafting import MAX_DRAFT, AdaptiveDraft, FixedDraft, draft_policy
from faulty_tier import FaultyTier
from flow.errors import ConfigError
from flow.reference_tier import ReferenceTier
from greedy import check_drafts_were_accepted_and_rejected, check_speculative, greedy

PROMPTS = [[17, 3, 250, 9], [5], [100, 101, 102, 103, 104, 105, 106, 107], [42, 7, 42, 7, 42, 7]]


def test_adaptive_drafts_give_the_full_model_s_output(agreeing_family):
    """Catches: a draft cut short or run long by the adaptive cap that breaks the verdict
    offsets or the rollback (the output would leave the full model's)."""
    family_dir, family = agreeing_family
    c = DeviceClient(family_dir, exit=0, cloud=ReferenceTier(family), mode="speculative",
                     draft_tokens="adaptive", retry_interval=0.0)
    results = [c.complete(p, max_new_tokens=24, ignore_eos=True) for p in PROMPTS * 2]
    near_ties = [t for p, r in zip(PROMPTS * 2, results, strict=True)
                 for t in check_speculative(family, p, r, 24)]
    check_drafts_were_accepted_and_rejected(results)
    assert near_ties == []
    assert c.drafting.round_trip_s is not None and 0 < c.drafting.acceptance < 1


def test_a_slow_link_gets_longer_drafts_than_a_fast_one(agreeing_family):
    """Catches: a cap that ignores the round trip (the point of adapting), or estimates fed the
    wrong times."""
    family_dir, family = agreeing_family
    drafts_per_round, caps = {}, {}
    for delay in (0.0, 0.3):
        tier = FaultyTier(ReferenceTier(family))
        tier.delay_s = delay
        c = DeviceClient(family_dir, exit=0, cloud=tier, mode="speculative",
                         draft_tokens="adaptive", retry_interval=0.0)
        results = [c.complete(p, max_new_tokens=32, ignore_eos=True) for p in PROMPTS[:2]]
        drafts = sum(r.drafts_accepted + r.drafts_rejected for r in results)
        drafts_per_round[delay] = drafts / sum(r.round_trips for r in results)
        assert c.drafting.round_trip_s >= delay
        caps[delay] = c.drafting.cap()
    assert caps[0.3] > caps[0.0] and drafts_per_round[0.3] > drafts_per_round[0.0], \
        (caps, drafts_per_round)


def _best_by_brute_force(acceptance, step_s, round_s):
    """argmax over k of (expected tokens per round) / (seconds per round), summed term by term."""
    rates = {k: sum(acceptance ** i for i in range(k + 1)) / (k * step_s + round_s)
             for k in range(1, MAX_DRAFT + 1)}
    return max(rates, key=rates.get)


@pytest.mark.parametrize("acceptance,step_s,round_s", [
    (0.8, 0.005, 0.100), (0.8, 0.005, 0.002), (0.5, 0.010, 0.050), (0.95, 0.002, 0.300),
    (0.1, 0.010, 0.010)])
def test_the_cap_maximises_settled_tokens_per_second(acceptance, step_s, round_s):
    drafting = AdaptiveDraft(device_step_s=step_s, round_trip_s=round_s)
    # an acceptance of exactly `acceptance`: accepted / trials with the prior's (1, 2) added
    drafting._trials = 1000.0
    drafting._accepted = acceptance * 1002 - 1
    assert drafting.acceptance == pytest.approx(acceptance)
    assert drafting.cap() == _best_by_brute_force(acceptance, step_s, round_s)


def test_estimates_converge_on_what_the_rounds_show():
    rng = np.random.default_rng(0)
    drafting = AdaptiveDraft()
    assert drafting.cap() == drafting.initial  # nothing measured yet
    for _ in range(200):
        drafts = int(rng.integers(1, 9))
        accepted = 0
        while accepted < drafts and rng.random() < 0.7:
            accepted += 1
        drafting.observe(drafts, accepted, device_s=0.004 * drafts, round_s=0.05)
    assert drafting.acceptance == pytest.approx(0.7, abs=0.08)
    assert drafting.device_step_s == pytest.approx(0.004)
    assert drafting.round_trip_s == pytest.approx(0.05)


def test_a_draft_is_cut_when_the_member_is_unsure():
    drafting = AdaptiveDraft(device_step_s=0.01, round_trip_s=0.02)
    drafting._accepted, drafting._trials = 8.0, 10.0
    seconds_per_token = 1 / drafting.tokens_per_second(drafting.cap())
    assert drafting.keep_drafting(chance=1.0)
    assert not drafting.keep_drafting(chance=0.9 * drafting.device_step_s / seconds_per_token)
    assert FixedDraft(3).keep_drafting(chance=0.0) and FixedDraft(3).cap() == 3


def test_a_draft_length_that_is_neither_a_count_nor_adaptive_is_refused():
    for bad in (0, -1, "many", 2.5, True):
        with pytest.raises(ConfigError, match="draft_tokens"):
            draft_policy(bad)


def test_auto_mode_tries_each_lossless_mode_then_keeps_the_faster(agreeing_family):
    """Catches: auto mode leaving the full model's output, never measuring a mode, or sticking
    with the slower one. Here every request pays 0.3 s, so `cloud` (one request per generation)
    beats `speculative` (one per round) once both are measured."""
    family_dir, family = agreeing_family
    tier = FaultyTier(ReferenceTier(family))
    tier.delay_s = 0.3
    c = DeviceClient(family_dir, exit=0, cloud=tier, mode="auto", draft_tokens=2,
                     retry_interval=0.0)
    results = [c.complete(p, max_new_tokens=12, ignore_eos=True) for p in PROMPTS[:3]]
    assert [r.mode for r in results] == ["speculative", "cloud", "cloud"]
    for prompt, result in zip(PROMPTS, results, strict=False):
        assert result.tokens == greedy(family, family.config.last_exit, prompt, 12)
    sampled = c.complete(PROMPTS[0], max_new_tokens=4, temperature=0.8, seed=1, ignore_eos=True)
    assert sampled.mode == "cloud"  # verification is greedy: a sampled request streams
