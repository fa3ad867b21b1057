"""`flow generate` as a user runs it: text, tiers visible, a summary, clear errors."""

import json
from types import SimpleNamespace

from tokenizers import Tokenizer

from greedy import check_drafts_were_accepted_and_rejected, check_same_greedy, check_speculative
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


def test_a_prompts_file_is_continued_prompt_by_prompt_by_one_client(agreeing_family, tmp_path):
    """Catches: a prompts file whose results come back out of order, merged, or from a client
    that forgot what it measured (auto mode must try both lossless modes, then settle)."""
    family_dir, family = agreeing_family
    texts = ["import heapq", "def parse(s):", "x = 1", "class A:"]
    (tmp_path / "prompts.json").write_text(json.dumps(texts))
    out = flow("generate", family_dir, "--prompts-file", tmp_path / "prompts.json", "--json",
               "--mode", "auto", "--cloud", "local", "--max-new-tokens", "6", "--ignore-eos")
    results = [SimpleNamespace(**json.loads(line)) for line in out.stdout.splitlines()]
    tokenizer = Tokenizer.from_file(str(family_dir / "tokenizer.json"))
    assert [r.prompt_tokens for r in results] == [len(tokenizer.encode(t).ids) for t in texts]
    assert [r.mode for r in results][:2] == ["speculative", "cloud"]
    for text, result in zip(texts, results, strict=True):
        assert check_same_greedy(family, family.config.last_exit, tokenizer.encode(text).ids,
                                 result.tokens, 6) == []
    for content, message in (("[]", "non-empty strings"), ("{", "not JSON")):
        (tmp_path / "bad.json").write_text(content)
        bad = flow("generate", family_dir, "--prompts-file", tmp_path / "bad.json", "--json",
                   check=False)
        assert bad.returncode == 1 and message in bad.stderr and "Traceback" not in bad.stderr
