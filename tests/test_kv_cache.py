"""The int8 KV cache: codes and scales against a numpy reference, and decoding through it against
the float cache."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pyllama_jax.model.config import preset
from pyllama_jax.model.kv_cache import KVCache, quantize_int8
from pyllama_jax.model.llama import init_model


def test_int8_codes_and_scales_match_numpy():
    x = np.random.default_rng(0).standard_normal((2, 5, 3, 16)).astype(np.float32)
    x[0, 0, 0] = 0.0  # an all-zero head keeps a zero scale and zero codes
    codes, scale = map(np.asarray, quantize_int8(jnp.asarray(x)))
    want_scale = np.abs(x).max(-1) / 127.0
    np.testing.assert_allclose(scale, want_scale, rtol=1e-7)
    want = np.clip(np.round(x / np.where(want_scale == 0, 1, want_scale)[..., None]), -127, 127)
    np.testing.assert_array_equal(codes, want)
    err = np.abs(codes * scale[..., None] - x)
    assert np.all(err <= 0.5 * scale[..., None] + 1e-7)


def test_int8_cache_decodes_like_the_float_cache_in_half_the_bytes():
    config = preset("tiny", dtype="bfloat16", param_dtype="bfloat16")
    ids = jnp.asarray(np.random.default_rng(1).integers(0, config.vocab_size, (2, 24)), jnp.int32)
    logits = {}
    for kv in ("auto", "int8"):
        c = config.replace(kv_dtype=kv)
        model = init_model(c, seed=3)
        cache = KVCache.create(c, 2, 32)
        steps = []
        for t in range(ids.shape[1]):  # one token at a time: every step reads the cache
            pos = jnp.full((2, 1), t, jnp.int32)
            out, cache = model(ids[:, t:t + 1], pos, cache)
            steps.append(out[:, 0])
        logits[kv] = np.asarray(jnp.stack(steps, 1), np.float32)
        logits[kv + "_bytes"] = sum(a.nbytes for a in jax.tree.leaves(cache))
    assert logits["int8"].shape == logits["auto"].shape
    # int8 keeps each cached value to within 1/254 of its head's largest: logits move by a small
    # fraction of their spread (bf16 compute alone moves them by ~1%).
    spread = logits["auto"].std()
    assert np.abs(logits["int8"] - logits["auto"]).max() < 0.05 * spread
    head_dim = config.head_dim
    assert logits["int8_bytes"] == pytest.approx(logits["auto_bytes"] * (head_dim + 4) / (2 * head_dim))


@pytest.mark.parametrize("t", [1, 5])
def test_write_matches_numpy_and_drops_past_the_end(t):
    from pyllama_jax.model.kv_cache import write

    rng = np.random.default_rng(2)
    cache = rng.standard_normal((4, 8, 2, 3)).astype(np.float32)
    new = rng.standard_normal((4, t, 2, 3)).astype(np.float32)
    starts = np.array([0, 3, 8 - t + 2, 8])  # in range, in range, partly past the end, wholly past it
    positions = starts[:, None] + np.arange(t)
    want = cache.copy()
    for b in range(4):
        for i in range(t):
            if positions[b, i] < 8:
                want[b, positions[b, i]] = new[b, i]
    got = write(jnp.asarray(cache), jnp.asarray(new), jnp.asarray(positions, jnp.int32))
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "int8"])
@pytest.mark.parametrize("batch,t,tail", [(16, 1, (8, 64)), (2, 1, (8, 64)), (8, 16, (8, 64)), (8, 1, (8,))])
def test_cache_write_is_in_place(dtype, batch, t, tail):
    """A decode or prefill step's cache update writes into the donated cache: no scratch copy of it
    (one row's worth of scratch at most), for every cache dtype and for the int8 cache's scales."""
    from pyllama_jax.model.kv_cache import write

    cache = jax.ShapeDtypeStruct((batch, 512) + tail, dtype)
    new = jax.ShapeDtypeStruct((batch, t) + tail, dtype)
    positions = jax.ShapeDtypeStruct((batch, t), jnp.int32)
    memory = jax.jit(write, donate_argnums=0).lower(cache, new, positions).compile().memory_analysis()
    assert memory.temp_size_in_bytes <= 512 * int(np.prod(tail)) * jnp.dtype(dtype).itemsize, memory.temp_size_in_bytes
