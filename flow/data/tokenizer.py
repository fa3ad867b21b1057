"""A byte-level BPE tokenizer trained on the corpus with `tokenizers`.

Byte-level, so any code (any Unicode, any whitespace) round-trips exactly; one special token,
`<|endoftext|>` (id 0), separates documents in token streams.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from flow.errors import DataError
from flow.fsutil import atomic_file

EOS_TOKEN = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"


def token_ids(tokenizer, tokens: Sequence[str]) -> list[int]:
    """Ids of `tokens` in `tokenizer`'s vocabulary, skipping those it lacks (none without one)."""
    if tokenizer is None:
        return []
    ids = (tokenizer.token_to_id(token) for token in tokens)
    return [i for i in ids if i is not None]


def stop_tokens_of(tokenizer, end_token_ids: Sequence[int]) -> tuple[str, ...]:
    """A checkpoint's declared end tokens, then flow's document separator where the vocabulary has
    it: a completion of plain code ends at the separator its training documents ended with, a
    chat reply at the declared end (SmolLM2-Instruct: `<|im_end|>`)."""
    if tokenizer is None:
        return (EOS_TOKEN,)
    tokens = [tokenizer.id_to_token(i) for i in end_token_ids if tokenizer.id_to_token(i) is not None]
    if tokenizer.token_to_id(EOS_TOKEN) is not None:
        tokens.append(EOS_TOKEN)
    return tuple(dict.fromkeys(tokens)) or (EOS_TOKEN,)


def train_tokenizer(documents: Iterable[str], vocab_size: int, min_frequency: int = 2):
    """Train a byte-level BPE tokenizer of `vocab_size` tokens (including the EOS token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise DataError(f"vocab_size must be at least {len(alphabet) + 1} (256 bytes + the EOS "
                        f"token), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=[EOS_TOKEN], initial_alphabet=alphabet,
                                  show_progress=False)
    tokenizer.train_from_iterator(documents, trainer=trainer)
    return tokenizer


def save_tokenizer(tokenizer, path: Path | str) -> Path:
    path = Path(path)
    with atomic_file(path) as tmp:
        tokenizer.save(str(tmp))
    return path


def load_tokenizer(path: Path | str):
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise DataError(f"no tokenizer at {path}; train one with `flow tokenizer CORPUS`")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises plain Exception on malformed JSON
        raise DataError(f"{path} is not a tokenizers tokenizer ({err})") from None


def eos_id(tokenizer) -> int:
    token_id = tokenizer.token_to_id(EOS_TOKEN)
    if token_id is None:
        raise DataError(f"the tokenizer has no {EOS_TOKEN} token; train it with `flow tokenizer`")
    return token_id


def vocab_size_of(tokenizer_json: str) -> int:
    """The vocabulary size of a serialised tokenizer, without building it."""
    data = json.loads(tokenizer_json)
    return len(data["model"]["vocab"]) + sum(
        1 for t in data.get("added_tokens", []) if t["content"] not in data["model"]["vocab"])
