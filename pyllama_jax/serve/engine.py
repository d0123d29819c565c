"""Continuous batching: requests join and leave a fixed set of decode slots at token boundaries.

Each slot is one row of a shared `KVCache`. A new request is prefilled into its row in chunks of
`prefill_chunk` tokens (one chunk per slot between decode steps, so running requests keep
streaming); then one jitted step decodes every active slot at its own position, with its own
temperature, top-k, top-p and random stream (`fold_in(key(seed), token_index)`, so a seeded request gives the same text
whatever else is running). A step runs on the smallest block of rows and cache positions that holds
every active slot, both rounded up to powers of two: one user does not pay for idle slots or unused
context, and a session compiles a handful of programs, all fixed by the slot count and context and all
compiled by `warmup()`, so no request stalls the others to compile one. A step computes log-
probabilities (`serve.logprobs`) only when one of its rows asked for them; `score()` rates whole
prompts with the uncached forward (`echo`). Buckets, the per-row text and stop rules (`decoding`) and
the jitting with shardings (`place.jit`) are the batch generator's.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import queue
import threading
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from pyllama_jax.decoding.buckets import pow2, pow2s
from pyllama_jax.decoding.text import TextStream
from pyllama_jax.eval.scoring import Scorer, Scores
from pyllama_jax.generate import sample
from pyllama_jax.model.kv_cache import KVCache
from pyllama_jax.model.llama import Llama
from pyllama_jax.serve.logprobs import TOP, TokenLogprob, entry, step_logprobs
from pyllama_jax.model import place
from pyllama_jax.sharding.rules import replicated, state_shardings
from pyllama_jax.tokenizer import Tokenizer

log = logging.getLogger(__name__)

MIN_WINDOW = 128  # smallest cache window a step attends over


class QueueFull(RuntimeError):
    """Every slot is busy and the waiting queue is full."""


@dataclasses.dataclass
class Event:
    """What a request receives: new text, and on its last event why it finished."""

    text: str
    finish_reason: str | None = None  # "stop" (EOS or stop string), "length", "cancelled" or "error"
    completion_tokens: int = 0  # tokens generated so far
    logprobs: list[TokenLogprob] | None = None  # with `Request.logprobs`: the tokens since the last event


@dataclasses.dataclass(eq=False)
class Request:
    """One generation: prompt token ids, sampling knobs and where its events go."""

    prompt: list[int]
    max_tokens: int
    on_event: Callable[[Event], None]  # called from the engine thread
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no cut
    seed: int = 0  # with temperature > 0: the same seed gives the same tokens
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # keep generating past end-of-sequence (benchmarks)
    logprobs: int | None = None  # report each token's logprob and this many alternatives (<= TOP)
    cancelled: bool = False


@dataclasses.dataclass(eq=False)
class _Slot:
    request: Request
    text: TextStream  # the generated text, token count and finish reason
    prefilled: int = 0  # prompt tokens already in the cache
    pending: list[TokenLogprob] = dataclasses.field(default_factory=list)  # logprobs not yet sent


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How many generations run at once and the context each gets (the `serve` section's engine part)."""

    slots: int = 8  # concurrent generations: rows of the decode batch
    context: int = 2048  # tokens per slot, prompt + completion (capped at the model's; 0 = the model's)
    max_queue: int = 64  # requests waiting for a slot before new ones are refused (HTTP 503)
    prefill_chunk: int = 64  # prompt tokens read per step (interleaved with decode steps)


class Engine:
    """A background thread that runs admitted requests through `slots` cache rows."""

    def __init__(self, model: Llama, tokenizer: Tokenizer, config: EngineConfig = EngineConfig(),
                 mesh: Mesh | None = None, **fields: Any):
        """`fields` override `config`'s (e.g. `slots=2`). `mesh`: the mesh the model's weights are
        sharded on (the cache is split the same way); None = one device."""
        c = dataclasses.replace(config, **fields)
        if c.slots < 1 or c.prefill_chunk < 1 or c.max_queue < 0 or c.context < 0:
            raise ValueError(f"serve: slots={c.slots} and prefill_chunk={c.prefill_chunk} must be >= 1, "
                             f"max_queue={c.max_queue} and context={c.context} >= 0")
        self.config, self.tokenizer = model.config, tokenizer
        self.slots, self.context = c.slots, min(c.context or model.config.max_seq_len, model.config.max_seq_len)
        self.max_queue, self.prefill_chunk = c.max_queue, c.prefill_chunk
        self._graphdef, self._state = nnx.split(model)
        self._mesh = mesh
        self._scorer = Scorer(model, mesh)
        self._cache = place.create_cache(self.config, self.slots, self.context, mesh)
        # One pair of programs per cache window (each compiled once per shape), jitted with shardings.
        w, r = state_shardings(self._state, mesh), replicated(mesh)  # the cache keeps its own sharding
        jit = lambda fn, n_args, window: place.jit(functools.partial(fn, window=window), mesh,
                                                   (w, None) + (r,) * n_args, (r, None), (1,))
        windows = pow2s(MIN_WINDOW, self.context)
        self._prefill = {window: jit(self._prefill_fn, 9, window) for window in windows}
        self._decode = {window: jit(self._decode_fn, 8, window) for window in windows}
        self._rows: list[_Slot | None] = [None] * self.slots
        self._waiting: collections.deque[Request] = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="pyllama-engine", daemon=True)
        # Host copies of the per-slot decode inputs.
        self._tokens = np.zeros(self.slots, np.int32)
        self._positions = np.zeros(self.slots, np.int32)
        self._seeds = np.zeros(self.slots, np.uint32)
        self._temperature = np.zeros(self.slots, np.float32)
        self._top_k = np.zeros(self.slots, np.int32)
        self._top_p = np.ones(self.slots, np.float32)
        self._want = np.zeros(self.slots, bool)  # the slot's request asked for logprobs

    # ---- jitted programs -------------------------------------------------------------------------

    @staticmethod
    def _row(cache: KVCache, slot: jax.Array, window: int) -> KVCache:
        """Row `slot`'s first `window` positions, as a one-row cache."""
        take = lambda a: jax.lax.dynamic_slice_in_dim(a[:, :window], slot, 1, axis=0)
        return jax.tree.map(take, cache)  # keys and values (and an int8 cache's scales)

    @staticmethod
    def _write_row(cache: KVCache, row: KVCache, slot: jax.Array, positions: jax.Array) -> KVCache:
        """Copy the entries a prefill wrote into `row` (at `positions[0, t]`) back to row `slot`.

        Only the new entries move (positions past the cache are dropped): writing the whole window
        back makes XLA copy the entire cache.
        """
        put = lambda big, small: big.at[slot, positions[0]].set(small[0, positions[0]], mode="drop")
        return jax.tree.map(put, cache, row)

    @staticmethod
    def _sample(logits, seeds, steps, temperature, top_k, top_p):
        """`generate.sample` with one random stream per row; plain argmax when every row is greedy."""
        def sampled():
            keys = jax.vmap(lambda s, n: jax.random.fold_in(jax.random.key(s), n))(seeds, steps)
            one = lambda lg, k, t, tk, tp: sample(lg[None], k, t[None], tk[None], tp[None])[0]
            return jax.vmap(one)(logits, keys, temperature, top_k, top_p)
        return jax.lax.cond(jnp.any(temperature > 0), sampled,
                            lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32))

    def _prefill_fn(self, state, cache, slot, tokens, start, last, seed, temperature, top_k, top_p, want, *,
                    window):
        """Run `tokens[1, chunk]` at positions `start...` through row `slot`; sample from index `last`
        (and its logprobs if `want`)."""
        model = nnx.merge(self._graphdef, state)
        positions = start + jnp.arange(tokens.shape[1])[None]
        logits, row = model(tokens, positions, self._row(cache, slot, window), logits_at=last[None])
        nxt = self._sample(logits[:, 0], seed[None], jnp.zeros(1, jnp.int32), temperature[None],
                           top_k[None], top_p[None])
        return (nxt, *step_logprobs(logits[:, 0], nxt, want[None])), self._write_row(cache, row, slot, positions)

    def _decode_fn(self, state, cache, tokens, positions, seeds, steps, temperature, top_k, top_p, wants, *,
                   window):
        """One token for each of the first `len(tokens)` slots, attending over the first `window`
        positions (a slot at position >= context writes nothing), with logprobs if a row `wants`."""
        model = nnx.merge(self._graphdef, state)
        logits, cache = model(tokens[:, None], positions[:, None], cache, kv_window=window)
        nxt = self._sample(logits[:, 0], seeds, steps, temperature, top_k, top_p)
        return (nxt, *step_logprobs(logits[:, 0], nxt, wants)), cache

    # ---- public API --------------------------------------------------------------------------------

    def start(self) -> "Engine":
        self._thread.start()
        return self

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=30)

    def warmup(self) -> None:
        """Compile every program a request can need: prefill for each cache window, decode for each
        window and row count (1, 2, 4, ..., slots)."""
        z = jnp.zeros((), jnp.int32)
        self._positions[:] = self.context  # idle rows: nothing is written
        for window in pow2s(MIN_WINDOW, self.context):
            if window >= self._prefill_window(0):
                _, self._cache = self._prefill[window](
                    self._state, self._cache, z, jnp.zeros((1, self.prefill_chunk), jnp.int32), z, z,
                    jnp.zeros((), jnp.uint32), jnp.zeros(()), z, jnp.ones(()), jnp.zeros((), bool))
            for rows in pow2s(1, self.slots):
                nxt, self._cache = self._decode[window](self._state, self._cache, *self._decode_inputs(rows))
        nxt[0].block_until_ready()

    def check(self, prompt_tokens: int, max_tokens: int) -> None:
        """Raise ValueError, saying by how much, if a request cannot fit the context."""
        if prompt_tokens < 1:
            raise ValueError("the prompt is empty")
        if max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens}: expected at least 1")
        over = prompt_tokens + max_tokens - self.context
        if over > 0:
            raise ValueError(f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) is "
                             f"{prompt_tokens + max_tokens} tokens, {over} more than this model's context "
                             f"of {self.context} tokens; shorten the prompt or lower max_tokens")

    def score(self, prompts: list[list[int]], top: int = 0) -> list[Scores]:
        """Each prompt's token logprobs and `top` alternatives (the uncached forward, on the calling
        thread); ValueError if a prompt is longer than the context or has ids outside the vocabulary."""
        for p in prompts:
            if len(p) > self.context:
                raise ValueError(f"the prompt ({len(p)} tokens) is longer than this model's context of "
                                 f"{self.context} tokens")
        return self._scorer.score(prompts, top)

    def submit(self, *requests: Request) -> None:
        """Queue requests (all or none); raises ValueError if one cannot fit, QueueFull if no room."""
        for r in requests:
            self.check(len(r.prompt), r.max_tokens)
        with self._cv:
            if self._closed:
                raise RuntimeError("the engine is closed")
            free = self._rows.count(None)
            if len(self._waiting) + len(requests) > self.max_queue + free:
                raise QueueFull(f"all {self.slots} slots are busy and {len(self._waiting)} requests are "
                                f"waiting (serve.max_queue={self.max_queue}); retry later")
            self._waiting.extend(requests)
            self._cv.notify_all()

    def cancel(self, *requests: Request) -> None:
        """Stop requests (a client went away): their slots are freed before the next step."""
        with self._cv:
            for r in requests:
                r.cancelled = True
            self._cv.notify_all()

    def stats(self) -> dict[str, int]:
        with self._cv:
            return {"slots": self.slots, "active": self.slots - self._rows.count(None),
                    "queued": len(self._waiting), "context": self.context}

    def stream(self, prompt: list[int], max_tokens: int, **knobs: Any) -> Iterator[Event]:
        """Submit one request from a plain thread and iterate over its events (closing cancels it).

        `knobs` are the other fields of `Request` (temperature, top_p, top_k, seed, stop, ignore_eos, logprobs).
        """
        events: queue.Queue[Event] = queue.Queue()
        request = Request(prompt, max_tokens, events.put, **knobs)
        self.submit(request)
        try:
            while True:
                event = events.get()
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            self.cancel(request)

    # ---- the engine thread -------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self._waiting and all(s is None for s in self._rows):
                    self._cv.wait()
                if self._closed:
                    break
                self._drop_cancelled()
                self._admit()
            try:
                self._prefill_step()
                if any(s is not None and s.prefilled == len(s.request.prompt) for s in self._rows):
                    self._decode_step()
            except Exception:  # a failed step leaves the donated cache unusable: start afresh
                log.exception("engine step failed; its requests end with finish_reason 'error'")
                self._cache = place.create_cache(self.config, self.slots, self.context, self._mesh)
                for i, s in enumerate(self._rows):
                    if s is not None:
                        self._finish(i, Event("", "error", s.text.generated))
        for i, s in enumerate(self._rows):
            if s is not None:
                self._finish(i, Event("", "cancelled", s.text.generated))
        while self._waiting:
            self._notify(self._waiting.popleft(), Event("", "cancelled", 0))

    def _drop_cancelled(self) -> None:
        for r in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(r)
            self._notify(r, Event("", "cancelled", 0))
        for i, s in enumerate(self._rows):
            if s is not None and s.request.cancelled:
                self._finish(i, Event("", "cancelled", s.text.generated))

    def _admit(self) -> None:
        for i in range(self.slots):
            if self._rows[i] is None and self._waiting:
                r = self._waiting.popleft()
                self._rows[i] = _Slot(r, TextStream(self.tokenizer, r.stop, r.max_tokens, r.ignore_eos))
                self._seeds[i] = np.uint32(r.seed & 0xFFFFFFFF)
                self._temperature[i], self._top_k[i], self._top_p[i] = r.temperature, r.top_k, r.top_p
                self._want[i] = r.logprobs is not None

    def _prefill_window(self, start: int) -> int:
        return pow2(start + self.prefill_chunk, MIN_WINDOW, self.context)

    def _prefill_step(self) -> None:
        """One prompt chunk for every slot that still has prompt to read."""
        for i, s in enumerate(self._rows):
            if s is None or s.prefilled == len(s.request.prompt):
                continue
            prompt, start = s.request.prompt, s.prefilled
            chunk = np.zeros((1, self.prefill_chunk), np.int32)
            part = prompt[start:start + self.prefill_chunk]
            chunk[0, :len(part)] = part
            nxt, self._cache = self._prefill[self._prefill_window(start)](
                self._state, self._cache, jnp.int32(i), jnp.asarray(chunk), jnp.int32(start),
                jnp.int32(len(part) - 1), jnp.uint32(self._seeds[i]), jnp.float32(self._temperature[i]),
                jnp.int32(self._top_k[i]), jnp.float32(self._top_p[i]), jnp.bool_(self._want[i]))
            s.prefilled += len(part)
            if s.prefilled == len(prompt):
                self._positions[i] = len(prompt)
                self._on_token(i, *self._host(nxt, 0, self._want[i]))

    def _decode_inputs(self, rows: int) -> tuple:
        steps = np.array([s.text.generated if s is not None else 0 for s in self._rows[:rows]], np.int32)
        return tuple(jnp.asarray(a[:rows]) for a in (self._tokens, self._positions, self._seeds)) + (
            jnp.asarray(steps),) + tuple(jnp.asarray(a[:rows]) for a in (self._temperature, self._top_k, self._top_p,
                                                                          self._want))

    def _decode_step(self) -> None:
        decoding = [i for i, s in enumerate(self._rows) if s is not None and s.prefilled == len(s.request.prompt)]
        rows = pow2(max(decoding) + 1, 1, self.slots)
        window = pow2(int(self._positions[decoding].max()) + 1, MIN_WINDOW, self.context)
        for i in range(rows):  # rows with no decoding request sit past the cache: their writes drop
            if i not in decoding:
                self._positions[i] = self.context
        out, self._cache = self._decode[window](self._state, self._cache, *self._decode_inputs(rows))
        want = bool(self._want[decoding].any())
        out = tuple(np.asarray(a) for a in (out if want else out[:1]))  # logprobs leave the device only if asked
        for i in decoding:
            self._positions[i] += 1
            self._on_token(i, *self._host(out, i, want))

    def _host(self, out: tuple, i: int, want: bool) -> tuple[int, tuple | None]:
        """Row `i` of a step's (tokens, logprobs, top ids, top logprobs): its token and, if wanted, the rest."""
        return int(np.asarray(out[0])[i]), (tuple(np.asarray(a)[i] for a in out[1:]) if want else None)

    def _on_token(self, i: int, token: int, logprobs: tuple | None = None) -> None:
        s = self._rows[i]
        r = s.request
        self._tokens[i] = token
        text = s.text.push(token)
        if r.logprobs is not None and not s.text.eos:  # the end-of-sequence token is not part of the text
            s.pending.append(entry(token, logprobs[0], logprobs[1], logprobs[2], min(r.logprobs, TOP)))
        if s.text.finish_reason is not None:
            self._finish(i, self._event(s, text, s.text.finish_reason))
        elif text:
            self._notify(r, self._event(s, text, None))

    @staticmethod
    def _event(s: _Slot, text: str, finish_reason: str | None) -> Event:
        """An event for slot `s`, carrying (and clearing) its pending logprobs if it asked for them."""
        logprobs = None
        if s.request.logprobs is not None:
            logprobs, s.pending = s.pending, []
        return Event(text, finish_reason, s.text.generated, logprobs)

    def _finish(self, i: int, event: Event) -> None:
        request = self._rows[i].request
        with self._cv:
            self._rows[i] = None
        self._notify(request, event)

    @staticmethod
    def _notify(request: Request, event: Event) -> None:
        try:
            request.on_event(event)
        except Exception:  # a consumer that went away must not stop the engine
            log.exception("on_event failed")
