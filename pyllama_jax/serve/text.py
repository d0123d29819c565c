"""Token ids in, text deltas out: incremental decoding that respects characters and stop strings."""
from __future__ import annotations

from typing import Sequence

from pyllama_jax.tokenizer import Tokenizer


class TextStream:
    """Decodes one generation token by token.

    A token that ends inside a multi-byte character yields nothing until the character is complete,
    and text that could be the start of a stop string is held back until it is known not to be one.
    The stop string itself and everything after it are never released.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""  # decoded so far, cut before the first stop string
        self.stopped = False  # a stop string was found
        self._prefix = self._read = 0  # ids[_prefix:_read] decode to the tail of `text`
        self._released = 0  # characters of `text` handed out

    def push(self, token: int) -> str:
        """Add one generated token; return the text that is now safe to show."""
        self.ids.append(int(token))
        self._decode(final=False)
        return self._release(final=False)

    def flush(self) -> str:
        """At the end of generation: the held-back text (minus any stop string)."""
        self._decode(final=True)
        return self._release(final=True)

    def _decode(self, final: bool) -> None:
        if self.stopped or self._read == len(self.ids):
            return
        # Decoding a window that starts a little earlier keeps tokenizer-specific leading spaces right.
        before = self.tokenizer.decode(self.ids[self._prefix:self._read])
        after = self.tokenizer.decode(self.ids[self._prefix:])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)

    def _release(self, final: bool) -> str:
        hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped, final = self.text[:min(hits)], True, True
        end = len(self.text) if final else len(self.text) - _partial_stop(self.text, self.stop)
        delta = self.text[self._released:end]
        self._released = max(self._released, end)
        return delta


def _partial_stop(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
