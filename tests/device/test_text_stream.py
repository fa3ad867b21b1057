"""TextStream with the family's real byte-level tokenizer: incremental text and stop strings.

The tokenizer has 320 tokens, so characters beyond ASCII are split into byte tokens and words
into several pieces; that is what makes partial characters and stop strings spanning tokens
happen here with ordinary text.
"""

import pytest
from tokenizers import Tokenizer

from device.text import REPLACEMENT, TextStream

MULTIBYTE = "s = 'café → 🐍 naïve'  # ok\n"


@pytest.fixture(scope="module")
def tokenizer(device_family) -> Tokenizer:
    return Tokenizer.from_file(str(device_family[0] / "tokenizer.json"))


def stream_pieces(tokenizer, text: str, stop=()) -> tuple[TextStream, list[str], list[int]]:
    """Push the tokens of `text` one by one until the stream stops; the pieces and the ids pushed."""
    stream = TextStream(tokenizer, stop)
    pieces, pushed = [], []
    for token in tokenizer.encode(text).ids:
        pieces.append(stream.push(token))
        pushed.append(token)
        if stream.stopped:
            break
    return stream, pieces, pushed


def test_the_tokenizer_splits_multibyte_characters_across_tokens(tokenizer):
    # The premise of the tests below: some token prefixes end inside a UTF-8 character.
    ids = tokenizer.encode(MULTIBYTE).ids
    prefixes = [tokenizer.decode(ids[:i]) for i in range(1, len(ids))]
    assert any(prefix.endswith(REPLACEMENT) for prefix in prefixes)


@pytest.mark.parametrize("text", [MULTIBYTE, "def f(x):\n    return x + 1\n\n\nclass A:\n    pass\n"])
def test_pieces_and_flush_make_exactly_the_decoded_text(tokenizer, text):
    stream, pieces, ids = stream_pieces(tokenizer, text)
    assert "".join(pieces) + stream.flush() == tokenizer.decode(ids) == text


def test_a_character_split_across_tokens_is_never_emitted_half_done(tokenizer):
    stream, pieces, _ = stream_pieces(tokenizer, MULTIBYTE)
    pieces.append(stream.flush())
    assert not any(REPLACEMENT in piece for piece in pieces)
    for character in "é→🐍ï":
        assert any(character in piece for piece in pieces)


def test_each_piece_is_released_as_soon_as_its_characters_are_complete(tokenizer):
    stream = TextStream(tokenizer)
    ids, emitted = tokenizer.encode(MULTIBYTE).ids, ""
    for count, token in enumerate(ids, 1):
        emitted += stream.push(token)
        assert emitted == tokenizer.decode(ids[:count]).rstrip(REPLACEMENT)


def test_a_stop_string_spanning_tokens_stops_before_it(tokenizer):
    text = "def f(x):\n    return None\n\n\ndef g():\n    pass\n"
    stop = "\n\n\ndef"
    assert stop not in [tokenizer.decode([t]) for t in tokenizer.encode(text).ids]  # it spans tokens
    stream, pieces, pushed = stream_pieces(tokenizer, text, stop=[stop])
    assert stream.stopped
    assert "".join(pieces) == "def f(x):\n    return None"
    assert stream.flush() == ""
    assert len(pushed) < len(tokenizer.encode(text).ids)  # the stream stopped at the stop string


def test_a_multibyte_stop_string_is_found_once_its_bytes_are_complete(tokenizer):
    stream, pieces, _ = stream_pieces(tokenizer, MULTIBYTE, stop=["→"])
    assert stream.stopped
    assert "".join(pieces) == "s = 'café "


def test_the_earliest_of_several_stop_strings_wins_whatever_their_order(tokenizer):
    text = "x = 1\n\n\ndef f():\n"
    # "de" is one token here: that one push completes both stop strings
    assert "de" in [tokenizer.decode([t]) for t in tokenizer.encode(text).ids]
    for stop in (["e", "d"], ["d", "e"]):
        stream, pieces, _ = stream_pieces(tokenizer, text, stop=stop)
        assert stream.stopped and "".join(pieces) == "x = 1\n\n\n", stop


def test_text_that_only_looks_like_a_stop_prefix_is_released_once_disproven(tokenizer):
    stop = "return None"
    text = "def f(x):\n    return x\n"
    ids = tokenizer.encode(text).ids
    stream, emitted, most_held = TextStream(tokenizer, [stop]), "", 0
    for count, token in enumerate(ids, 1):
        emitted += stream.push(token)
        decoded = tokenizer.decode(ids[:count])
        # held back: the longest tail of the text that could still grow into the stop string
        held = max((size for size in range(1, len(stop)) if decoded.endswith(stop[:size])), default=0)
        most_held = max(most_held, held)
        assert emitted == decoded[:len(decoded) - held], decoded
    assert most_held == len("return ")  # "return " waited for the token that disproved it
    assert not stream.stopped
    assert emitted == text and stream.flush() == ""


def test_held_back_stop_prefix_comes_out_at_flush(tokenizer):
    text = "x = 1\n    return"
    stream, pieces, _ = stream_pieces(tokenizer, text, stop=["return None"])
    assert "".join(pieces) == "x = 1\n    "
    assert stream.flush() == "return"
