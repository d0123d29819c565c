"""Token ids in, text deltas out: incremental decoding with the stop rules of a generation.

One stream per generated row, shared by the batch generator and the serving engine: `TokenStream`
decides when a row is over (EOS unless ignored, max tokens); `TextStream` adds the text, decoding only
a short window per token (never the whole row again), holding back incomplete characters and possible
starts of stop strings, and ending the row at a stop string.
"""
from __future__ import annotations

from typing import Sequence

from pyllama_jax.tokenizer import Tokenizer


class TokenStream:
    """The token-level end of one generated row: an end-of-sequence token (unless `ignore_eos`; it is
    not one of the row's `ids`) finishes it with "stop", the `max_tokens`-th token with "length"."""

    def __init__(self, eos_ids: frozenset[int] | set[int], max_tokens: int | None = None, ignore_eos: bool = False):
        self.eos_ids, self.max_tokens, self.ignore_eos = eos_ids, max_tokens, ignore_eos
        self.ids: list[int] = []  # the row's tokens (an ending EOS is not one)
        self.eos = False  # an end-of-sequence token ended the row
        self.generated = 0  # tokens pushed, an ending EOS included
        self.finish_reason: str | None = None  # "stop" or "length" once the row is over

    def push(self, token: int) -> str:
        """Add one generated token; return the text that is now safe to show (all of it once over)."""
        if self.finish_reason is not None:
            raise ValueError(f"token {token} pushed after the generation finished ({self.finish_reason})")
        self.generated += 1
        if int(token) in self.eos_ids and not self.ignore_eos:
            self.eos, self.finish_reason = True, "stop"
            return self.flush()
        self.ids.append(int(token))
        delta = self._text()
        if self.finish_reason is None and self.max_tokens is not None and self.generated >= self.max_tokens:
            self.finish_reason = "length"
            delta += self.flush()
        return delta

    def flush(self) -> str:
        """At the end of generation: the held-back text (none without a tokenizer)."""
        return ""

    def _text(self) -> str:
        """The text the newest token releases (none without a tokenizer)."""
        return ""


class TextStream(TokenStream):
    """Decodes one generation token by token.

    A token that ends inside a multi-byte character yields nothing until the character is complete,
    and text that could be the start of a stop string is held back until it is known not to be one.
    The stop string itself and everything after it are never released; it finishes the row ("stop").
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), max_tokens: int | None = None,
                 ignore_eos: bool = False):
        super().__init__(tokenizer.eos_ids, max_tokens, ignore_eos)
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.text = ""  # decoded so far, cut before the first stop string
        self.stopped = False  # a stop string was found
        self._prefix = self._read = 0  # ids[_prefix:_read] decode to the tail of `text`
        self._released = 0  # characters of `text` handed out

    def flush(self) -> str:
        """At the end of generation: the held-back text (minus any stop string)."""
        self._decode(final=True)
        return self._release(final=True)

    def _text(self) -> str:
        self._decode(final=False)
        delta = self._release(final=False)
        if self.stopped:
            self.finish_reason = "stop"
        return delta

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
