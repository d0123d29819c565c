"""Token log-probabilities for the OpenAI API: computed in the engine's steps, shaped for the wire.

What is reported is the model's raw distribution, `log_softmax(logits)` at temperature 1 with no
top-k/top-p cut (as vLLM does by default), whatever the request samples with: the numbers score
the text, they do not describe the sampler.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pyllama_jax.tokenizer import Tokenizer

TOP = 20  # alternatives an engine step computes per token (chat's top_logprobs maximum)
MAX_COMPLETIONS = 5  # legacy completions' `logprobs` maximum


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """One token, its log-probability and the most likely alternatives at its position."""

    token: int
    logprob: float | None  # None: the first token of a prompt (nothing predicts it)
    top: tuple[tuple[int, float], ...] = ()


def step_logprobs(logits: jax.Array, tokens: jax.Array, want: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Inside a jitted step: `tokens[b]`' log-probabilities under `logits[b, vocab]` and the TOP best
    `(ids, logprobs)`; zeros (nothing computed) unless some row `want`s them."""
    b = logits.shape[0]

    def computed():
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        values, index = jax.lax.top_k(logp, TOP)
        return jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0], index.astype(jnp.int32), values

    skipped = lambda: (jnp.zeros(b, jnp.float32), jnp.zeros((b, TOP), jnp.int32), jnp.zeros((b, TOP), jnp.float32))
    return jax.lax.cond(jnp.any(want), computed, skipped)


def entry(token: int, logprob: float, top_ids: np.ndarray, top_values: np.ndarray, n: int) -> TokenLogprob:
    return TokenLogprob(int(token), float(logprob), tuple((int(i), float(v)) for i, v in zip(top_ids[:n], top_values[:n])))


def token_strings(tokenizer: Tokenizer, ids: Sequence[int], before: Sequence[int] = ()) -> list[str]:
    """Each token's text as it reads after `before` and the tokens preceding it (a few tokens of
    context keep a sentencepiece word's leading space); special tokens are shown, not dropped."""
    context, out = list(before[-4:]), []
    for t in ids:
        head = tokenizer.decode(context, skip_special=False)
        context.append(int(t))
        out.append(tokenizer.decode(context, skip_special=False)[len(head):])
        context = context[-4:]
    return out


def completion_logprobs(tokenizer: Tokenizer, entries: Sequence[TokenLogprob], offset: int = 0,
                        before: Sequence[int] = ()) -> dict[str, Any]:
    """OpenAI's legacy `logprobs` object (an entry whose logprob is None, the first prompt token
    under `echo`, has null alternatives); `offset`: where the first token starts in the text."""
    ids = [e.token for e in entries]
    texts = token_strings(tokenizer, ids, before)
    names = _names(tokenizer, entries, ids, texts)
    offsets = list(np.cumsum([offset] + [len(t) for t in texts[:-1]])) if texts else []
    return {"tokens": texts,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [None if e.logprob is None else _top_dict(e, names) for e in entries],
            "text_offset": [int(o) for o in offsets]}


def _names(tokenizer: Tokenizer, entries: Sequence[TokenLogprob], ids: list[int], texts: list[str]) -> dict[int, str]:
    """Token id -> text for every token and alternative (alternatives read on their own)."""
    names = dict(zip(ids, texts))
    for e in entries:
        for t, _ in e.top:
            if t not in names:
                names[t] = tokenizer.decode([t], skip_special=False)
    return names


def _top_dict(e: TokenLogprob, names: dict[int, str]) -> dict[str, float]:
    """The alternatives and the chosen token (OpenAI: up to logprobs + 1 entries), by text."""
    top = {names[t]: v for t, v in e.top}
    top.setdefault(names[e.token], e.logprob)
    return top


def chat_logprobs(tokenizer: Tokenizer, entries: Sequence[TokenLogprob], before: Sequence[int] = ()) -> dict[str, Any]:
    """The chat API's `logprobs`: `{"content": [{token, logprob, bytes, top_logprobs}, ...]}`."""
    ids = [e.token for e in entries]
    texts = token_strings(tokenizer, ids, before)
    names = _names(tokenizer, entries, ids, texts)
    item = lambda text, lp: {"token": text, "logprob": lp, "bytes": list(text.encode())}
    return {"content": [{**item(text, e.logprob), "top_logprobs": [item(names[t], v) for t, v in e.top]}
                        for text, e in zip(texts, entries)]}
