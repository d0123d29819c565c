"""Text generation: a jitted prefill, then a decode step that compiles once per (batch, cache) shape.

Prompts of different lengths are right-padded into one batch; every row keeps its own position,
so rows finish independently. Prompt and cache lengths are rounded up to a few fixed buckets
(`decoding.buckets`), so a session compiles a handful of programs, not one per prompt; each row's
text and stop rules are a `decoding.text.TextStream`, as in the serving engine.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from pyllama_jax.decoding.buckets import pow2
from pyllama_jax.decoding.text import TextStream, TokenStream
from pyllama_jax.model.llama import Llama
from pyllama_jax.model import place
from pyllama_jax.sharding.rules import replicated, state_shardings
from pyllama_jax.tokenizer import Tokenizer

MIN_BUCKET = 16

_COMPILE_EVENTS = frozenset(f"/jax/core/compile/{e}_duration" for e in ("jaxpr_trace", "jaxpr_to_mlir_module",
                                                                         "backend_compile"))
_compile_spans: collections.deque[tuple[float, float]] = collections.deque(maxlen=4096)  # (start, end), time.time()


def _record_compile(event: str, start: float, end: float, **_: object) -> None:
    if event in _COMPILE_EVENTS:
        _compile_spans.append((start, end))


jax.monitoring.register_event_time_span_listener(_record_compile)


def compile_seconds(start: float, end: float) -> float:
    """Wall time within [start, end] (`time.time()`) that JAX spent tracing, lowering and compiling."""
    recent = itertools.takewhile(lambda span: span[1] > start, reversed(_compile_spans.copy()))  # newest last
    total, covered = 0.0, start
    for s, e in sorted(recent):  # the union of possibly nested spans
        s, e = max(s, covered), min(e, end)
        if e > s:
            total, covered = total + e - s, e
    return total


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to pick each next token."""

    max_new_tokens: int = 128  # tokens generated per prompt at most
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # keep the k most likely tokens; 0 = all
    top_p: float = 1.0  # keep the smallest set whose probability reaches p
    seed: int = 0  # sampling RNG seed
    stop: tuple[str, ...] = ()  # stop when the generated text contains one of these
    ignore_eos: bool = False  # keep going past end-of-sequence tokens (benchmarks)


@dataclasses.dataclass
class Generation:
    """What `generate` returns: texts, token ids and timing.

    A call that compiles a program counts as compile time (with that program's first, slow run): the
    prefill is then timed again, and such a decode step is timed at the mean of the others.
    """

    texts: list[str]
    tokens: list[list[int]]
    finish_reasons: list[str]  # "stop" (EOS or stop string) or "length"
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    compile_seconds: float  # tracing and compiling the programs this call was the first to need

    @property
    def generated_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_second(self) -> float:
        """Decode throughput over all rows (tokens after the first, which prefill produces)."""
        n = self.generated_tokens - len(self.tokens)
        return n / self.decode_seconds if self.decode_seconds > 0 else float("nan")

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else float("nan")

    def report(self) -> str:
        compiled = f"compile {self.compile_seconds:.1f} s; " if self.compile_seconds else ""
        tps = self.tokens_per_second
        decode = f"decode {tps:.1f} tok/s" if tps == tps else "decode not timed (every step compiled)"
        return (f"prompt {self.prompt_tokens} tok, generated {self.generated_tokens} tok; {compiled}"
                f"prefill {self.prefill_tokens_per_second:.0f} tok/s; {decode}")


def sample(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array,
           top_p: jax.Array) -> jax.Array:
    """Next tokens `[b]` from `logits[b, vocab]`; per-row temperature (0 = greedy), top-k, top-p."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]

    def truncated() -> jax.Array:  # top-k / top-p: rank the vocabulary
        order = jnp.argsort(-logits, axis=-1)
        ranked = jnp.take_along_axis(scaled, order, axis=-1)
        rank = jnp.arange(logits.shape[-1])[None, :]
        ranked = jnp.where((top_k[:, None] > 0) & (rank >= top_k[:, None]), -jnp.inf, ranked)
        probs = jax.nn.softmax(ranked, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
        ranked = jnp.where((before >= top_p[:, None]) & (rank > 0), -jnp.inf, ranked)
        choice = jax.random.categorical(key, ranked, axis=-1)
        picked = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
        return jnp.where(temperature > 0, picked, greedy)

    def plain() -> jax.Array:
        return jnp.where(temperature > 0, jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32), greedy)

    # Sorting the vocabulary costs milliseconds per step on a CPU: only rows that cut need it.
    sampling = temperature > 0
    cuts = jnp.any(sampling & ((top_k > 0) | (top_p < 1.0)))
    return jax.lax.cond(cuts, truncated, lambda: jax.lax.cond(jnp.any(sampling), plain, lambda: greedy))


class Generator:
    """Compiled prefill and decode programs for one model."""

    def __init__(self, model: Llama, tokenizer: Tokenizer, mesh: Mesh | None = None):
        """`mesh`: run sharded (weights as placed by the sharding rules, cache split on the mesh)."""
        self.graphdef, self.state = nnx.split(model)
        self.config = model.config
        self.tokenizer = tokenizer
        self.mesh = mesh
        w, r = state_shardings(self.state, mesh), replicated(mesh)  # the cache keeps its own sharding
        # Two pairs of programs, the greedy one without the sampler: sorting and drawing over the
        # vocabulary nearly doubles a decode step's compile time, and most runs are greedy.
        self._prefill = {greedy: place.jit(functools.partial(self._prefill_fn, greedy=greedy), mesh,
                                           (w, r, r, None, r, r, r, r), (r, None), (3,)) for greedy in (False, True)}
        self._decode = {greedy: place.jit(functools.partial(self._decode_fn, greedy=greedy), mesh,
                                          (w, None, r, r, r, r, r, r), (r, None), (1,)) for greedy in (False, True)}

    @staticmethod
    def _pick(logits, key, temperature, top_k, top_p, greedy: bool) -> jax.Array:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32) if greedy else sample(logits, key, temperature, top_k, top_p)

    def _prefill_fn(self, state, tokens, lengths, cache, key, temperature, top_k, top_p, *, greedy: bool):
        model = nnx.merge(self.graphdef, state)
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        logits, cache = model(tokens, positions, cache, logits_at=lengths - 1)
        return self._pick(logits[:, 0], key, temperature, top_k, top_p, greedy), cache

    def _decode_fn(self, state, cache, tokens, positions, key, temperature, top_k, top_p, *, greedy: bool):
        model = nnx.merge(self.graphdef, state)
        logits, cache = model(tokens[:, None], positions[:, None], cache)
        return self._pick(logits[:, 0], key, temperature, top_k, top_p, greedy), cache

    def encode_prompts(self, prompts: Sequence[str | Sequence[int]]) -> list[list[int]]:
        ids = [self.tokenizer.encode(p) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
        for i, row in enumerate(ids):
            if not row:
                raise ValueError(f"prompt {i} is empty")
        return ids

    def rows(self, n: int, sampling: SamplingConfig) -> list[TextStream]:
        """One `TextStream` per prompt: the text, tokens and finish reason of its row."""
        return [TextStream(self.tokenizer, sampling.stop, sampling.max_new_tokens, sampling.ignore_eos)
                for _ in range(n)]

    def stream(self, prompts: Sequence[str | Sequence[int]], sampling: SamplingConfig = SamplingConfig(),
               stats: dict | None = None, rows: Sequence[TokenStream] | None = None,
               on_text: Callable[[int, str], None] | None = None) -> Iterator[list[int | None]]:
        """Yield, per step, the new token of each row (None once a row has finished).

        Each token is pushed into its row of `rows` (default: `TokenStream`s, which end a row at EOS or
        max_new_tokens; `self.rows(...)` also decodes the text and ends a row at a stop string), whose
        `finish_reason` ends the row; `on_text(row, delta)` receives the text a push releases. `stats`,
        if given, receives the prompt token count, decode steps, compile seconds and prefill/decode
        seconds without compilation (see `Generation`).
        """
        ids = self.encode_prompts(prompts)
        b, longest = len(ids), max(len(r) for r in ids)
        if rows is None:
            rows = [TokenStream(self.tokenizer.eos_ids, sampling.max_new_tokens, sampling.ignore_eos) for _ in ids]
        if len(rows) != b:
            raise ValueError(f"{len(rows)} rows for {b} prompts")
        limit = self.config.max_seq_len
        if longest + sampling.max_new_tokens > limit:
            raise ValueError(f"prompt of {longest} tokens + max_new_tokens={sampling.max_new_tokens} "
                             f"exceeds the model's context of {limit} tokens by "
                             f"{longest + sampling.max_new_tokens - limit}")
        t = pow2(longest, MIN_BUCKET, limit)
        tokens = np.zeros((b, t), np.int32)
        for i, row in enumerate(ids):
            tokens[i, :len(row)] = row
        lengths = np.array([len(r) for r in ids], np.int32)
        cache_len = pow2(longest + sampling.max_new_tokens, MIN_BUCKET, limit)
        knobs = (jnp.full((b,), sampling.temperature, jnp.float32), jnp.full((b,), sampling.top_k, jnp.int32),
                 jnp.full((b,), sampling.top_p, jnp.float32))
        key, sub = jax.random.split(jax.random.key(sampling.seed))
        greedy = sampling.temperature <= 0

        def prefill() -> tuple[np.ndarray, Any, float, float]:
            """A timed prefill on a fresh cache: next tokens, the cache, seconds and compile seconds in them."""
            cache = place.create_cache(self.config, b, cache_len, self.mesh)
            start = time.time()  # the clock of JAX's compile events
            nxt, cache = self._prefill[greedy](self.state, jnp.asarray(tokens), jnp.asarray(lengths), cache, sub, *knobs)
            nxt_host = np.asarray(nxt)
            end = time.time()
            return nxt_host, cache, end - start, compile_seconds(start, end)

        nxt_host, cache, prefill_seconds, prefill_compile = prefill()
        if prefill_compile:  # a new program's first run (compile, then warm-up): time an identical second run
            del cache
            prefill_compile = prefill_seconds
            nxt_host, cache, prefill_seconds, _ = prefill()
        if stats is not None:
            stats.update(prompt_tokens=int(lengths.sum()), prefill_seconds=prefill_seconds,
                         compile_seconds=prefill_compile)
        positions = lengths.copy()
        calls, warm_calls, warm_seconds, compiled = 0, 0, 0.0, prefill_compile
        while True:
            out: list[int | None] = [None] * b
            for i, row in enumerate(rows):
                if row.finish_reason is None:
                    out[i] = int(nxt_host[i])
                    delta = row.push(out[i])
                    if delta and on_text is not None:
                        on_text(i, delta)
            if stats is not None:  # every decode step at the mean time of those that compiled nothing
                mean = warm_seconds / warm_calls if warm_calls else float("nan")
                stats.update(decode_seconds=mean * calls if calls else 0.0, decode_steps=calls,
                             compile_seconds=compiled)
            yield out
            if all(row.finish_reason is not None for row in rows):
                return
            key, sub = jax.random.split(key)
            start = time.time()
            nxt, cache = self._decode[greedy](self.state, cache, jnp.asarray(nxt_host), jnp.asarray(positions), sub, *knobs)
            nxt_host = np.asarray(nxt)
            seconds = time.time() - start
            calls += 1
            if compile_seconds(start, start + seconds):
                compiled += seconds  # a new program's first run: compile, then warm-up
            else:
                warm_calls, warm_seconds = warm_calls + 1, warm_seconds + seconds
            positions += 1

    def generate(self, prompts: Sequence[str | Sequence[int]], sampling: SamplingConfig = SamplingConfig(),
                 on_text: Callable[[int, str], None] | None = None) -> Generation:
        """Generate for a batch of prompts; `on_text(row, delta)` streams text as it is produced."""
        rows, stats = self.rows(len(prompts), sampling), {}
        for _ in self.stream(prompts, sampling, stats, rows, on_text):
            pass
        return Generation([r.text for r in rows], [r.ids for r in rows], [r.finish_reason for r in rows],
                          stats["prompt_tokens"], stats["prefill_seconds"], stats.get("decode_seconds", 0.0),
                          stats.get("decode_steps", 0), stats["compile_seconds"])
