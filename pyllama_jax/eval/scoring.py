"""Log-probabilities of whole token sequences: the scoring behind lm-eval and the server's `echo`.

`Scorer.score(rows)` runs each row but its last token (which is only a target) through the
model's uncached forward once and returns, for every position after the first, the log-softmax of
the raw logits (temperature 1, no truncation) at the row's next token, plus the `top` most likely
tokens there; a row may so be one token longer than the context. Rows are padded on the right and
grouped into batches whose row count and length are powers of two (the length capped at the
model's context), so a session compiles a handful of programs; a batch holds at most
`token_budget` tokens, which bounds the float32 logits alive at once.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from pyllama_jax.decoding.buckets import pow2
from pyllama_jax.model.llama import Llama
from pyllama_jax.model import place
from pyllama_jax.sharding.rules import replicated, state_shardings

TOP_SIZES = (0, 5, 20)  # alternatives computed per position: the smallest of these >= what is asked
MIN_LENGTH = 64  # shorter forwards cost about the same (weights dominate): one program for them all


@dataclasses.dataclass(frozen=True)
class Scores:
    """Row `ids[n]`'s scores at positions 1..n-1 (what predicts token i sits at index i - 1)."""

    logprobs: np.ndarray  # [n-1] float32: log p(ids[i] | ids[:i])
    top_ids: np.ndarray  # [n-1, top] int32, most likely first
    top_logprobs: np.ndarray  # [n-1, top] float32

    @property
    def greedy(self) -> np.ndarray:
        """[n-1] bool: the token is the model's most likely one (needs `top` >= 1)."""
        return self.logprobs >= self.top_logprobs[:, 0]


def _score_fn(graphdef: Any, top: int):
    def score(state, ids, mask):  # ids[b, t + 1]: the forward reads t tokens, predicting ids[:, 1:]
        logits, _ = nnx.merge(graphdef, state)(ids[:, :-1], attention_mask=mask[:, :-1])
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        chosen = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
        if top == 0:
            empty = ids[:, 1:, None][..., :0]
            return chosen, empty, empty.astype(jnp.float32)
        values, index = jax.lax.top_k(logp, top)
        return chosen, index.astype(jnp.int32), values
    return score


_PROGRAMS: dict[tuple, Any] = {}  # (graphdef, top, mesh) -> jitted program: scorers of one model share compilations


class Scorer:
    """Compiled scoring programs for one model (thread-safe: JAX calls are)."""

    def __init__(self, module: Llama, mesh: Mesh | None = None, token_budget: int = 4096, max_batch: int = 16,
                 min_batch: int = 1):
        """`min_batch`: rows every batch is padded to at least (fewer programs for a long evaluation)."""
        self.config = module.config
        self.max_len = module.config.max_seq_len
        self.token_budget, self.max_batch = max(token_budget, 1), max(max_batch, 1)
        self.min_batch = min(max(min_batch, 1), self.max_batch)
        self._graphdef, self._state = nnx.split(module)
        self._mesh = mesh

    def _fn(self, top: int):
        key = (self._graphdef, top, self._mesh)
        if key not in _PROGRAMS:
            w, r = state_shardings(self._state, self._mesh), replicated(self._mesh)
            _PROGRAMS[key] = place.jit(_score_fn(self._graphdef, top), self._mesh, (w, r, r), r)
        return _PROGRAMS[key]

    def check(self, row: Sequence[int]) -> None:
        """Raise ValueError naming what is wrong with one row."""
        if len(row) > self.max_len + 1:
            raise ValueError(f"a sequence of {len(row)} tokens exceeds the model's context of {self.max_len} "
                             f"(plus the last token, which is only scored)")
        bad = [t for t in row if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})")

    def score(self, rows: Sequence[Sequence[int]], top: int = 0) -> list[Scores]:
        """Scores of each row (in the order given); `top`: alternatives per position (<= 20)."""
        if top > TOP_SIZES[-1]:
            raise ValueError(f"top={top}: at most {TOP_SIZES[-1]} alternatives per position")
        k = next(s for s in TOP_SIZES if s >= top)
        for row in rows:
            self.check(row)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        out: list[Scores | None] = [None] * len(rows)
        start = 0
        while start < len(order):  # longest first: a batch's first row sets its length
            length = pow2(len(rows[order[start]]) - 1, MIN_LENGTH, self.max_len)  # tokens the forward reads
            fit = max(1, min(self.max_batch, self.token_budget // length))
            take = order[start:start + fit]
            batch = pow2(len(take), self.min_batch, self.max_batch)
            if batch > fit:  # the power of two would break the budget: round down instead
                batch = 1 << (fit.bit_length() - 1)
                take = take[:batch]
            for i, s in zip(take, self._run([rows[i] for i in take], batch, length, k)):
                out[i] = Scores(s.logprobs, s.top_ids[:, :top], s.top_logprobs[:, :top])
            start += len(take)
        return out  # type: ignore[return-value]

    def _run(self, rows: list[Sequence[int]], batch: int, length: int, k: int) -> list[Scores]:
        ids = np.zeros((batch, length + 1), np.int32)
        mask = np.zeros((batch, length + 1), np.int32)
        for i, row in enumerate(rows):
            ids[i, :len(row)], mask[i, :len(row)] = row, 1
        chosen, index, values = (np.asarray(a) for a in self._fn(k)(self._state, jnp.asarray(ids), jnp.asarray(mask)))
        return [Scores(chosen[i, :len(r) - 1], index[i, :len(r) - 1], values[i, :len(r) - 1])
                for i, r in enumerate(rows)]
