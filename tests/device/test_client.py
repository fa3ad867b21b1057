"""The device SDK's modes against the reference model, with an in-process next tier."""

from pathlib import Path

import numpy as np
import pytest

from device import DeviceClient
from device.client import CloudRequiredError
from flow.errors import ConfigError
from flow.reference_tier import ReferenceTier
from flow.tier import Exhausted
from greedy import check_drafts_were_accepted_and_rejected, check_same_greedy, check_speculative, greedy

PROMPTS = [[17, 3, 250, 9], [5], [100, 101, 102, 103, 104, 105, 106, 107], [64, 64, 64],
           [1, 300, 2, 299, 3], [42, 7, 42, 7, 42, 7, 42]]


def client(device_family, tier, **options):
    options.setdefault("exit", 0)
    return DeviceClient(device_family[0], cloud=tier, retry_interval=0.0, **options)


def complete(c, prompt, **options):
    return c.complete(prompt, ignore_eos=True, **options)  # a random model emits EOS anywhere


def test_exit_mode_with_no_confident_token_is_the_full_model(device_family, tier):
    """Catches: a token the tier settled that is not the full model's (a wrong catch-up start,
    a dropped pending row), or a generation cut short."""
    near_ties = []
    c = client(device_family, tier, mode="exit", threshold=1.5)  # max_prob never reaches 1.5
    for prompt in PROMPTS:
        result = complete(c, prompt, max_new_tokens=16)
        assert set(result.tiers) == {"cloud"} and result.round_trips == 16
        near_ties += check_same_greedy(device_family[1], 2, prompt, result.tokens, 16)
    assert near_ties == []


def test_exit_mode_with_every_token_confident_is_the_member(device_family, tier):
    """Catches: the device escalating a confident token, or its member's output going wrong."""
    near_ties = []
    c = client(device_family, tier, mode="exit", threshold=-1.0)
    for prompt in PROMPTS:
        result = complete(c, prompt, max_new_tokens=16)
        assert set(result.tiers) == {"device"} and result.round_trips == 0
        near_ties += check_same_greedy(device_family[1], 0, prompt, result.tokens, 16)
    assert near_ties == []


def test_the_agreeing_family_agrees_often_but_not_always(agreeing_family):
    """The premise of every speculative test: member 0's greedy token is the full model's at
    some positions and not at others, and the next tier's blocks decide some tokens (a tier that
    skipped them, or attended to a stale cache, would change the output)."""
    import torch

    family = agreeing_family[1]
    agree = decided_by_tier = total = 0
    with torch.no_grad():
        for prompt in PROMPTS:
            sequence = prompt + greedy(family, 2, prompt, 20)
            rows = slice(len(prompt) - 1, len(sequence) - 1)
            full = family.logits(sequence, exit=2)[0, rows].argmax(-1)
            member = family.logits(sequence, exit=0)[0, rows].argmax(-1)
            final = family.model.exits[2]
            skipped = final.head(final.norm(family.handoff(sequence, exit=0)))[0, rows].argmax(-1)
            agree += int((full == member).sum())
            decided_by_tier += int((full != skipped).sum())
            total += len(full)
    print(f"member 0 agrees at {agree}/{total}; the tier's blocks decide {decided_by_tier}/{total}")
    assert 0.35 * total < agree < 0.85 * total
    assert decided_by_tier > 0.1 * total


@pytest.mark.parametrize("draft_tokens", [1, 2, 3, 5, 8])
def test_speculative_mode_is_exactly_the_full_model(agreeing_family, draft_tokens):
    """Catches: an accepted draft the full model would not have produced (a wrong verdict
    offset), a rollback that leaves a rejected draft's keys in the tier's cache or the device's,
    and drafts never being accepted or never rejected."""
    family_dir, family = agreeing_family
    c = DeviceClient(family_dir, exit=0, cloud=ReferenceTier(family), mode="speculative",
                     draft_tokens=draft_tokens, retry_interval=0.0)
    results, near_ties = [], []
    for prompt in PROMPTS:
        result = complete(c, prompt, max_new_tokens=20)
        near_ties += check_speculative(family, prompt, result, 20)
        results.append(result)
    check_drafts_were_accepted_and_rejected(results)
    assert near_ties == []


def test_speculative_from_a_deeper_member(agreeing_family):
    """Member 1 drafts, the tier continues after exit 1: the same bookkeeping from another exit."""
    family_dir, family = agreeing_family
    c = DeviceClient(family_dir, exit=1, cloud=ReferenceTier(family), mode="speculative",
                     draft_tokens=4)
    results = [complete(c, prompt, max_new_tokens=24) for prompt in PROMPTS]
    near_ties = [t for prompt, r in zip(PROMPTS, results, strict=True)
                 for t in check_speculative(family, prompt, r, 24)]
    check_drafts_were_accepted_and_rejected(results)
    assert near_ties == []


def test_mixed_exit_mode_escalates_exactly_the_unconfident_tokens(device_family, tier):
    from flow.confidence import confidence

    family = device_family[1]
    prompt = PROMPTS[0]
    c = client(device_family, tier, mode="exit", policy="margin", threshold=0.3)
    result = complete(c, prompt, max_new_tokens=24)
    assert 0 < result.tiers.count("device") < 24, result.tiers
    sequence = prompt + result.tokens
    for i, tier_name in enumerate(result.tiers):
        context = sequence[:len(prompt) + i]
        device_logits = family.logits(context, exit=0)[0, -1].numpy()
        confident = confidence(device_logits, "margin") >= 0.3
        assert tier_name == ("device" if confident else "cloud")
        exit = 0 if confident else 2
        assert result.tokens[i] == int(family.logits(context, exit=exit)[0, -1].argmax())


def test_cloud_mode_sends_token_ids_and_gets_the_full_model(device_family, tier):
    prompt = PROMPTS[2]
    result = complete(client(device_family, tier, mode="cloud"), prompt, max_new_tokens=12)
    assert result.tokens == greedy(device_family[1], 2, prompt, 12)
    assert result.bytes_sent == 4 * len(prompt) and set(result.tiers) == {"cloud"}
    times = result.token_times  # what time-between-tokens figures are made of
    assert len(times) == 12 and times == sorted(times)
    assert times[0] == result.timings["first_token_s"] and times[-1] <= result.timings["total_s"]


def test_outage_keeps_generating_offline_then_catches_up_exactly(device_family, any_tier):
    """Catches: a device that fails instead of going on alone, an offline token that is not the
    member's, and a catch-up or replay (after the tier lost every session) that is not exact."""
    tier = any_tier
    family = device_family[1]
    prompt = PROMPTS[0]
    c = client(device_family, tier, mode="exit", threshold=1.5)
    steps = []
    for i, step in enumerate(c.generate(prompt, max_new_tokens=18, ignore_eos=True)):
        steps.append(step)
        if i == 3:
            tier.reachable = False
        if i == 8:
            tier.reachable = True
        if i == 12:
            tier.drop_sessions()  # a restarted tier: the client replays from position 0
    offline = [s.offline for s in steps]
    assert offline == [False] * 4 + [True] * 5 + [False] * 9
    sequence = prompt + [s.token for s in steps]
    for i, step in enumerate(steps):  # every online token is the full model's next token
        context = sequence[:len(prompt) + i]
        exit = 0 if step.offline else 2
        assert step.token == int(family.logits(context, exit=exit)[0, -1].argmax()), i
        assert step.tier == ("device" if step.offline else "cloud")


def test_a_tier_at_capacity_is_an_outage_not_an_error(device_family, any_tier):
    """Catches: `Exhausted` (RESOURCE_EXHAUSTED: every KV slot busy) failing the generation
    instead of the device going on with its own token and retrying, and a catch-up after it that
    is not exact."""
    tier = any_tier
    family = device_family[1]
    prompt = PROMPTS[0]
    c = client(device_family, tier, mode="exit", threshold=1.5)
    tier.refuse_with(Exhausted("all 4 KV slots are held by requests in progress"))
    steps = list(c.generate(prompt, max_new_tokens=6, ignore_eos=True))
    assert [s.offline for s in steps] == [True] + [False] * 5
    sequence = prompt + [s.token for s in steps]
    for i, step in enumerate(steps):
        exit = 0 if step.offline else 2
        assert step.token == int(family.logits(sequence[:len(prompt) + i], exit=exit)[0, -1].argmax()), i


def test_a_member_file_that_is_not_the_one_exported_is_refused(device_family, tmp_path):
    """Catches: a corrupted device.onnx, or another family's member with its metadata hash
    edited, running and producing garbage (the file hash recorded at export must match)."""
    import shutil

    from flow.errors import HashMismatchError

    copy = tmp_path / "fam"
    shutil.copytree(device_family[0], copy)
    member = copy / "members" / "0" / "device.onnx"
    data = bytearray(member.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)  # 64 bytes in the middle of the weights
    member.write_bytes(bytes(data))
    with pytest.raises(HashMismatchError, match="is not the member that was exported"):
        DeviceClient(copy, exit=0)
    shutil.copy(copy / "members" / "1" / "device.onnx", member)  # a member, but not this one
    with pytest.raises(HashMismatchError, match="is not the member that was exported"):
        DeviceClient(copy, exit=0)
    DeviceClient(copy, exit=1)  # the untouched member still loads


def test_require_cloud_raises_instead_of_going_offline(device_family, tier):
    tier.reachable = False
    c = client(device_family, tier, mode="exit", threshold=1.5, require_cloud=True)
    with pytest.raises(CloudRequiredError, match="unreachable"):
        complete(c, PROMPTS[0], max_new_tokens=4)
    tier.reachable = True
    c = client(device_family, tier, mode="cloud")
    tier.reachable = False
    result = complete(c, PROMPTS[0], max_new_tokens=5)  # cloud mode falls back to the member
    assert result.offline == [True] * 5 and result.tokens == greedy(device_family[1], 0, PROMPTS[0], 5)


def test_generation_stops_at_the_familys_stop_tokens(device_family, tier, tmp_path):
    """Catches: a device (or a cloud-mode stream) that generates past the family's end token, or
    one that stops at a token the family does not declare (family.json `stop_tokens`)."""
    import json
    import shutil

    family_dir, family = device_family
    prompt = PROMPTS[0]
    continuation = greedy(family, 0, prompt, 16)
    index = next(i for i in range(3, 16) if continuation[i] not in continuation[:i])
    stop = family.tokenizer.id_to_token(continuation[index])
    copy = Path(shutil.copytree(family_dir, tmp_path / "fam"))
    manifest = json.loads((copy / "family.json").read_text())
    manifest["tokenizer"]["stop_tokens"] = ["<|im_end|>", stop]  # the first is not in the vocabulary
    (copy / "family.json").write_text(json.dumps(manifest))
    local = DeviceClient(copy, exit=0).complete(prompt, max_new_tokens=16)
    assert local.tokens == continuation[:index + 1] and local.finish_reason == "stop"
    ignored = DeviceClient(copy, exit=0).complete(prompt, max_new_tokens=16, ignore_eos=True)
    assert ignored.tokens == continuation and ignored.finish_reason == "length"
    expected = greedy(family, 2, prompt, 16)
    cut = next((i for i, t in enumerate(expected) if t == continuation[index]), None)
    cloud = DeviceClient(copy, exit=0, cloud=tier, mode="cloud").complete(prompt, max_new_tokens=16)
    assert cloud.tokens == (expected if cut is None else expected[:cut + 1])


def test_text_prompt_streams_text_and_stops_at_a_stop_string(device_family, tier):
    c = client(device_family, tier)
    full = complete(c, "def parse(s):\n", max_new_tokens=30)
    assert full.text == c.tokenizer.decode(full.tokens)
    stop = full.text[len(full.text) // 2:len(full.text) // 2 + 2]
    cut = complete(c, "def parse(s):\n", max_new_tokens=30, stop=[stop])
    assert cut.finish_reason == "stop" and stop not in cut.text
    assert full.text.startswith(cut.text) and len(cut.text) == full.text.index(stop)


def test_sampling_is_reproducible_by_seed_and_escalated_sampling_uses_the_tiers_top_k(device_family, tier):
    c = client(device_family, tier, mode="exit", policy="entropy", threshold=-1.5)
    a = complete(c, PROMPTS[0], max_new_tokens=16, temperature=1.0, top_k=20, seed=7)
    b = complete(c, PROMPTS[0], max_new_tokens=16, temperature=1.0, top_k=20, seed=7)
    other = complete(c, PROMPTS[0], max_new_tokens=16, temperature=1.0, top_k=20, seed=8)
    assert a.tokens == b.tokens and a.tiers == b.tiers and a.tokens != other.tokens
    greedy_result = complete(c, PROMPTS[0], max_new_tokens=16)
    nearly_greedy = complete(c, PROMPTS[0], max_new_tokens=16, temperature=1.0, top_k=1, seed=3)
    assert nearly_greedy.tokens == greedy_result.tokens


def test_escalated_sampling_follows_the_tiers_top_k_distribution(device_family, tier):
    """Catches: an escalated token sampled from the device's logits, from the wrong ids (an
    index into the top-k list instead of its token id), or without the temperature. Every
    first token is escalated; over 400 seeds its frequencies must match softmax(top-5 logits
    of the full model / T) (chi-square, 4 degrees of freedom, p < 0.001 fails)."""
    import torch

    family, prompt, k, temperature, draws = device_family[1], PROMPTS[0], 5, 2.0, 400
    with torch.no_grad():
        values, ids = family.logits(prompt, exit=2)[0, -1].topk(k)
    expected = torch.softmax(values / temperature, 0).numpy() * draws
    c = client(device_family, tier, mode="exit", threshold=1.5)
    counts = dict.fromkeys(ids.tolist(), 0)
    for seed in range(draws):
        result = complete(c, prompt, max_new_tokens=1, temperature=temperature, top_k=k, seed=seed)
        assert result.tiers == ["cloud"] and result.tokens[0] in counts, result.tokens
        counts[result.tokens[0]] += 1
    observed = np.array(list(counts.values()))
    chi_square = float(((observed - expected) ** 2 / expected).sum())
    print(f"observed {observed.tolist()}, expected {expected.round(1).tolist()}, chi2 {chi_square:.2f}")
    assert chi_square < 18.47


def test_int8_member_agrees_with_fp32_on_most_next_tokens(device_family, tier):
    from device.member import MemberSession

    members = device_family[0] / "members" / "0"
    text = "import heapq\n\ndef smallest(items, n):\n    return heapq.nsmallest(n, items)\n"
    ids = DeviceClient(device_family[0]).tokenizer.encode(text * 2).ids[:80]
    fp32 = MemberSession(members / "device.onnx").run(ids, 0).logits.argmax(-1)
    int8 = MemberSession(members / "device.int8.onnx").run(ids, 0).logits.argmax(-1)
    agreement = float(np.mean(fp32 == int8))  # teacher-forced top-1 agreement
    print(f"int8 top-1 agreement with fp32: {agreement:.3f} over {len(ids)} positions")
    assert agreement >= 0.8
    result = complete(client(device_family, tier, int8=True), PROMPTS[2], max_new_tokens=8)
    assert len(result.tokens) == 8


@pytest.mark.parametrize("options, prompt, message", [
    ({"exit": 3}, [1], "exits 0..2"),
    ({}, [], "prompt is empty"),
    ({}, list(range(96)), "96 tokens; this member's context is 96"),
    ({}, [1000], "outside the vocabulary"),
    ({"mode": "warp"}, [1], "unknown mode"),
    ({"mode": "speculative", "temperature": 0.5}, [1], "greedy drafts"),
    ({"policy": "vibes"}, [1], "unknown confidence policy"),
    ({"exit": 2, "mode": "exit"}, [1], "full model"),
])
def test_bad_requests_say_what_is_wrong(device_family, tier, options, prompt, message):
    options = dict(options)
    request = {k: options.pop(k) for k in ("temperature",) if k in options}
    with pytest.raises(ConfigError, match=message):
        cloud = options.pop("cloud", tier)
        c = DeviceClient(device_family[0], cloud=cloud, **{"exit": 0, **options})
        complete(c, prompt, max_new_tokens=4, **request)
