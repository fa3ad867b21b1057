"""Turning a stream of token ids into a stream of text, with stop strings.

A byte-level BPE token can end in the middle of a UTF-8 character, and a stop string can span
tokens, so text is released only once it is final: never a trailing replacement character, never
a tail that could still become a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"


class TextStream:
    """Decodes generated tokens incrementally and finds stop strings in them."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.tokens: list[int] = []
        self.released = 0  # characters of the decoded text handed out so far
        self.stopped = False

    def _text(self) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(self.tokens, skip_special_tokens=False)

    def push(self, token: int) -> str:
        """Add a token; returns the text it makes final (possibly "")."""
        self.tokens.append(token)
        text = self._text()
        # one token can complete several stop strings: stop at the earliest, whatever their order
        found = [at for stop in self.stop
                 if (at := text.find(stop, max(0, self.released - len(stop)))) != -1]
        if found:
            self.stopped = True
            return self._release(text, min(found))
        end = len(text)
        while end > self.released and text[end - 1] == REPLACEMENT:
            end -= 1  # an unfinished UTF-8 sequence: wait for the next token
        for stop in self.stop:  # hold back a tail that may be the start of a stop string
            for size in range(min(len(stop) - 1, end - self.released), 0, -1):
                if text[end - size:end] == stop[:size]:
                    end -= size
                    break
        return self._release(text, end)

    def flush(self) -> str:
        """The text still held back, at the end of a generation."""
        return "" if self.stopped else self._release(self._text(), None)

    def _release(self, text: str, end: int | None) -> str:
        end = len(text) if end is None else end
        piece = text[self.released:end] if end > self.released else ""
        self.released = max(self.released, end)
        return piece
