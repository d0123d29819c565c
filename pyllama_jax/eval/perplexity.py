"""Perplexity under GPTQ's protocol, and pyllama's token-by-token `--benchmark N --check`.

Perplexity: the text's token ids cut into non-overlapping windows of `seqlen` (remainder dropped);
per window the mean cross-entropy of its `seqlen - 1` next-token predictions; `exp` of the mean
over windows.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from pyllama_jax.data.text import DATASETS, eval_windows, load_text
from pyllama_jax.model.kv_cache import KVCache
from pyllama_jax.model.llama import Llama


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    window_nlls: np.ndarray  # mean negative log-likelihood of each window
    seconds: float

    @property
    def windows(self) -> int:
        return len(self.window_nlls)


def _nll_fn(graphdef):
    def nll(state, ids):
        logits, _ = nnx.merge(graphdef, state)(ids)
        logits = logits[:, :-1]
        target = jnp.take_along_axis(logits, ids[:, 1:, None], axis=-1)[..., 0]
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - target, axis=-1)
    return jax.jit(nll)


def window_nlls(module: Llama, windows: np.ndarray, batch_size: int = 4, progress: bool = True) -> np.ndarray:
    """Mean next-token NLL of each row of `windows[n, seqlen]` (compiled once per batch shape)."""
    graphdef, state = nnx.split(module)
    fn = _nll_fn(graphdef)
    out = []
    for i in tqdm(range(0, len(windows), batch_size), desc="perplexity", unit="batch", disable=not progress):
        out.append(np.asarray(fn(state, jnp.asarray(windows[i:i + batch_size]))))
    return np.concatenate(out)


def corpus_ids(tokenizer: Any, text_or_source: str, split: str = "test") -> list[int]:
    """Token ids (no BOS) of a corpus name, a local file (`path[@start:end]`) or literal text."""
    path = text_or_source.partition("@")[0]
    is_source = text_or_source in DATASETS or os.path.isfile(os.path.expanduser(path))
    text = load_text(text_or_source, split) if is_source else text_or_source
    return tokenizer.encode(text, bos=False)


def perplexity(model: Any, text_or_source: str, seqlen: int = 2048, max_windows: int | None = None,
               batch_size: int = 4, progress: bool = True) -> PerplexityResult:
    """Perplexity of a loaded model (`pj.load(...)`) on a corpus name, local file or text.

    `max_windows` caps the number of windows evaluated (from the start of the text).
    """
    if seqlen > model.config.max_seq_len:
        raise ValueError(f"seqlen={seqlen} exceeds the model's context of {model.config.max_seq_len}")
    windows = eval_windows(corpus_ids(model.tokenizer, text_or_source), seqlen, max_windows)
    start = time.perf_counter()
    nlls = window_nlls(model.module, windows, batch_size, progress)
    return PerplexityResult(float(np.exp(nlls.mean())), nlls, time.perf_counter() - start)


@dataclasses.dataclass(frozen=True)
class BenchmarkResult:
    median_seconds_per_token: float
    perplexity: float | None  # of tokens 2..N given their prefixes, with `check`


def benchmark(module: Llama, ids: Sequence[int], check: bool = False) -> BenchmarkResult:
    """pyllama's `--benchmark N --check`: feed `ids` one token at a time through the KV cache,
    timing each step; with `check`, the perplexity of each next token."""
    ids = np.asarray(ids, np.int32)
    graphdef, state = nnx.split(module)

    @jax.jit
    def step(state, cache, token, position):
        logits, cache = nnx.merge(graphdef, state)(token[None, None], position[None, None], cache)
        return jax.nn.log_softmax(logits[0, 0]), cache

    cache = KVCache.create(module.config, 1, len(ids))
    times, nll = [], 0.0
    for i in tqdm(range(len(ids)), desc="benchmark", unit="tok"):
        tick = time.perf_counter()
        logp, cache = step(state, cache, jnp.int32(ids[i]), jnp.int32(i))
        logp.block_until_ready()
        times.append(time.perf_counter() - tick)
        if check and i + 1 < len(ids):
            nll -= float(logp[ids[i + 1]])
    ppl = float(np.exp(nll / (len(ids) - 1))) if check and len(ids) > 1 else None
    return BenchmarkResult(float(np.median(times[1:] or times)), ppl)


def report(model: Any, q: Any) -> None:
    """Print perplexity on each corpus of a job's `quant.eval`, then its `quant.benchmark`."""
    corpora = [q.eval] if isinstance(q.eval, str) else list(q.eval)
    print(f"model: {model.describe()}")
    for corpus in corpora:
        r = perplexity(model, corpus, seqlen=q.seqlen, max_windows=q.eval_windows or None, batch_size=q.batch_size)
        print(f"{corpus}: perplexity {r.perplexity:.3f} over {r.windows} windows of {q.seqlen} ({r.seconds:.0f} s)")
    if q.benchmark:
        if not corpora:
            raise ValueError("quant.benchmark needs a corpus in quant.eval to take its tokens from")
        ids = corpus_ids(model.tokenizer, corpora[0])[:q.benchmark]
        b = benchmark(model.module, ids, check=q.check)
        print(f"benchmark: {b.median_seconds_per_token * 1e3:.1f} ms/token (median over {len(ids)} tokens)"
              + (f", perplexity {b.perplexity:.3f}" if b.perplexity is not None else ""))
