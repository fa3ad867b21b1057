"""A GGUF file's tokenizer metadata -> a `tokenizers` Tokenizer.

A GGUF file carries no tokenizer.json: it stores the vocabulary as metadata under llama.cpp's keys
(`tokenizer.ggml.model`, `.tokens`, `.merges`, `.token_type`, `.pre`, special token ids and the
add-BOS/EOS flags). Byte-level BPE (`model == "gpt2"`: GPT-2, SmolLM2, Qwen, StarCoder) is built
here. How text is split before BPE is not in the file, only a name for it (`pre`); the splits
below are llama.cpp's for those names, since llama.cpp is what produced and runs these files.

Decisions:
- `pre` names this table lacks are refused rather than guessed: a wrong split changes the ids
  silently. (`transformers` falls back to the GPT-2 split for names it lacks, e.g. SmolLM2's
  "smollm", and so differs from llama.cpp where whitespace precedes a digit.)
- Tokens marked CONTROL become special added tokens, USER_DEFINED ones plain added tokens, both
  matched whole in the text, as llama.cpp does.
- BOS/EOS are added to every encoding only when the file's add_bos_token/add_eos_token say so.
"""

from __future__ import annotations

from typing import Any

from flow.errors import ArtifactError, ConfigError

CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types

# Digits alone first, then the GPT-2 split: llama.cpp's StarCoder family of pre-tokenizers.
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "codeshell", "command-r")
# Qwen2's split (letters after one non-letter, single digits, punctuation runs with newlines).
_QWEN2_SPLIT = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
                r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(pre: str, where: str):
    """The pre-tokenizer llama.cpp uses for `tokenizer.ggml.pre == pre`."""
    from tokenizers import Regex, pre_tokenizers

    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("default", "gpt2"):
        return gpt2
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
    if pre == "qwen2":
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    supported = ", ".join(["default", "gpt2", "qwen2", *_DIGITS_THEN_GPT2])
    raise ConfigError(f"{where}: the tokenizer's pre-tokenizer {pre!r} is not supported "
                      f"(supported: {supported})")


def tokenizer_from_gguf(checkpoint: Any, where: str):
    """The `tokenizers.Tokenizer` a GGUF file describes, or None when it has no tokenizer.

    `checkpoint` offers `get(key, default)` over the file's metadata (`flow.gguf.GGUFCheckpoint`).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    kind = checkpoint.get("tokenizer.ggml.model")
    if kind is None:
        return None
    if kind != "gpt2":
        raise ConfigError(f"{where}: only byte-level BPE GGUF tokenizers (tokenizer.ggml.model "
                          f"'gpt2') are supported, this one is {kind!r}")
    tokens = checkpoint.get("tokenizer.ggml.tokens")
    merges = checkpoint.get("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise ArtifactError(f"{where}: a BPE tokenizer needs tokenizer.ggml.tokens and .merges")
    types = checkpoint.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    pairs = [tuple(merge.split(" ")) for merge in merges]
    if any(len(pair) != 2 for pair in pairs):
        raise ArtifactError(f"{where}: tokenizer.ggml.merges holds an entry that is not two "
                            f"space-separated tokens")
    tokenizer = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=pairs,
                                     fuse_unk=False))
    tokenizer.pre_tokenizer = _pre_tokenizer(checkpoint.get("tokenizer.ggml.pre", "default"), where)
    tokenizer.decoder = decoders.ByteLevel()
    typed = list(zip(tokens, types, strict=True))
    tokenizer.add_special_tokens([AddedToken(token, normalized=False, special=True)
                                  for token, token_type in typed if token_type == CONTROL])
    tokenizer.add_tokens([AddedToken(token, normalized=False, special=False)
                          for token, token_type in typed if token_type == USER_DEFINED])
    bos, eos = _added_special(checkpoint, tokens, "bos"), _added_special(checkpoint, tokens, "eos")
    if bos or eos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=" ".join([*(token for token, _ in bos), "$A", *(token for token, _ in eos)]),
            special_tokens=[*bos, *eos])
    return tokenizer


def _added_special(checkpoint: Any, tokens: list[str], kind: str) -> list[tuple[str, int]]:
    """[(token, id)] of the BOS or EOS token when the file asks to add it to every encoding."""
    token_id = checkpoint.get(f"tokenizer.ggml.{kind}_token_id")
    if not checkpoint.get(f"tokenizer.ggml.add_{kind}_token", False) or token_id is None:
        return []
    return [(tokens[token_id], token_id)]
