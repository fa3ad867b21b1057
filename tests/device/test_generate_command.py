"""`flow generate` as a user runs it: text, tiers visible, a summary, clear errors."""

import json
from types import SimpleNamespace

from tokenizers import Tokenizer

from greedy import check_drafts_were_accepted_and_rejected, check_speculative
from runs import flow


def test_local_generation_prints_prompt_continuation_and_summary(device_family):
    out = flow("generate", device_family[0], "--prompt", "def parse(s):", "--max-new-tokens", "12")
    assert out.stdout.startswith("def parse(s):")
    assert "device 100%" in out.stderr and "0 round trips" in out.stderr


def test_speculative_generation_against_the_local_reference_is_the_full_model(agreeing_family):
    """Catches: `flow generate --mode speculative` printing anything but the full model's greedy
    output, or not passing --draft-tokens on (each length must accept and reject drafts)."""
    family_dir, family = agreeing_family
    prompt = Tokenizer.from_file(str(family_dir / "tokenizer.json")).encode("import heapq").ids
    results = []
    for draft_tokens in (1, 2, 3, 5, 8):
        out = flow("generate", family_dir, "--prompt", "import heapq", "--mode", "speculative",
                   "--cloud", "local", "--max-new-tokens", "16", "--draft-tokens", draft_tokens,
                   "--ignore-eos", "--json")
        result = SimpleNamespace(**json.loads(out.stdout))
        assert check_speculative(family, prompt, result, 16) == []
        results.append(result)
    check_drafts_were_accepted_and_rejected(results)


def test_colour_marks_the_tokens_the_next_tier_settled(device_family):
    out = flow("generate", device_family[0], "--prompt", "x = ", "--mode", "exit", "--cloud", "local",
               "--threshold", "1.5", "--max-new-tokens", "4", "--color", "always")
    assert "\033[1;34m" in out.stdout and "device 0%" in out.stderr


def test_bad_requests_fail_with_one_line(device_family):
    out = flow("generate", device_family[0], "--prompt", "", check=False)
    assert out.returncode == 1 and "prompt is empty" in out.stderr and "Traceback" not in out.stderr
    out = flow("generate", device_family[0], "--prompt", "x", "--mode", "exit", check=False)
    assert out.returncode == 1 and "needs a next tier" in out.stderr
