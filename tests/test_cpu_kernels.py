"""The CPU decode kernels (`pyllama_jax/kernels/cpu.py`: matmuls and attention over the cache)
against numpy, and decoding through them against decoding through XLA alone (`PYLLAMA_CPU_KERNELS=0`)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pyllama_jax.kernels import cpu
from pyllama_jax.model.packing import group_index, pack


def _numpy_dequantize(codes, scales, zeros, g_idx):
    """W[i, o] = scale[g_idx[i], o] * (code[i, o] - zero[g_idx[i], o]), in float64."""
    return np.asarray(scales, np.float64)[g_idx] * (codes - zeros[g_idx])


def test_kernels_build_on_this_machine():
    """CI has a compiler: the kernels must build there, or every figure below silently tests XLA."""
    assert cpu.applies(jnp.zeros((1, 8)), jnp.bfloat16)
    assert cpu.applies(jnp.zeros((1, 8)), jnp.float32)
    assert not cpu.applies(jnp.zeros((1, 8)), jnp.int8)
    assert not cpu.applies(jnp.zeros((cpu.MAX_ROWS + 1, 8)), jnp.bfloat16)  # a prefill stays with XLA


@pytest.mark.parametrize("rows", [1, 3, 8, 16])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_dense_matmul_matches_numpy(rows, dtype):
    rng = np.random.default_rng(rows)
    k, n = 300, 1100  # neither a multiple of the kernel's tiles
    x = rng.standard_normal((rows, k)).astype(np.float32)
    w = jnp.asarray(rng.standard_normal((k, n)) * 0.05, dtype)
    want = x.astype(np.float64) @ np.asarray(w, np.float64)
    got = np.asarray(jax.jit(cpu.dense_matmul, static_argnums=2)(jnp.asarray(x), w, False))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    got_t = np.asarray(jax.jit(cpu.dense_matmul, static_argnums=2)(jnp.asarray(x), w.T.copy(), True))
    np.testing.assert_allclose(got_t, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_dense_matmul_gradients_match_numpy():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 40)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((40, 24)) * 0.1, jnp.bfloat16)
    dy = rng.standard_normal((2, 24))
    for transposed, stored in ((False, w), (True, w.T.copy())):
        gx, gw = jax.grad(lambda x, w: jnp.sum(cpu.dense_matmul(x, w, transposed) * dy), (0, 1))(x, stored)
        wf = np.asarray(w, np.float64)
        np.testing.assert_allclose(np.asarray(gx), dy @ wf.T, rtol=1e-5, atol=1e-5)
        want_w = np.asarray(x, np.float64).T @ dy
        np.testing.assert_allclose(np.asarray(gw, np.float64), want_w.T if transposed else want_w, rtol=1e-2,
                                   atol=1e-2)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("groupsize,act_order", [(128, False), (32, False), (-1, False), (128, True)])
def test_packed_matmul_matches_numpy(bits, groupsize, act_order):
    """Every bit width; a last partial group (K = 600); per-column groups; act-order's shuffled g_idx."""
    rng = np.random.default_rng(bits * 1000 + groupsize)
    k, n, rows = 600, 200, 3
    groups = 1 if groupsize == -1 else -(-k // groupsize)
    codes = rng.integers(0, 2 ** bits, (k, n))
    zeros = rng.integers(0, 2 ** bits, (groups, n))
    zeros[0, :5] = 0  # stored as 2**bits - 1 (v1's zero - 1)
    scales = (rng.random((groups, n)) * 0.02 + 0.001).astype(np.float16)
    g_idx = group_index(k, groupsize)
    if act_order:
        g_idx = rng.permutation(g_idx)
    qw = pack(codes, scales, zeros, g_idx, bits, groupsize)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    want = x.astype(np.float64) @ _numpy_dequantize(codes, scales, zeros, g_idx)
    fn = jax.jit(lambda x, a, b, c, d: cpu.packed_matmul(x, a, b, c, d, bits, groupsize))
    got = np.asarray(fn(jnp.asarray(x), qw.qweight, qw.scales, qw.qzeros, qw.g_idx))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def _numpy_attention(q, k, v, positions):
    """Softmax attention of each query over the cache slots up to its position, in float64 (a query
    at a negative position sees no slot and, like a softmax of equal masked scores, averages all)."""
    b, t, heads, d = q.shape
    slots, groups = k.shape[1], heads // k.shape[2]
    out = np.zeros(q.shape)
    for i in range(b):
        for j in range(t):
            seen = min(positions[i, j] + 1, slots) if positions[i, j] >= 0 else 0
            for h in range(heads):
                keys, values = (np.asarray(a[i, :, h // groups], np.float64) for a in (k, v))
                if seen:
                    scores = keys[:seen] @ q[i, j, h] / np.sqrt(d)
                    p = np.exp(scores - scores.max())
                    out[i, j, h] = p @ values[:seen] / p.sum()
                else:
                    out[i, j, h] = values.mean(axis=0)
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("batch,t,heads,kv_heads,head_dim,slots,window", [(1, 1, 9, 3, 64, 256, 256),
                                                                          (3, 2, 8, 2, 32, 40, 40),
                                                                          (4, 1, 4, 4, 16, 7, 5)])
def test_decode_attention_matches_numpy(dtype, batch, t, heads, kv_heads, head_dim, slots, window):
    """The kernel stores the new keys and values in the cache (one spare row, which must not change;
    positions outside the slots dropped), then attends over the first `window` slots."""
    rng = np.random.default_rng(slots)
    q = rng.standard_normal((batch, t, heads, head_dim)).astype(np.float32)
    new_k, new_v = (jnp.asarray(rng.standard_normal((batch, t, kv_heads, head_dim)), dtype) for _ in range(2))
    cache = tuple(jnp.asarray(rng.standard_normal((batch + 1, slots, kv_heads, head_dim)), dtype) for _ in range(2))
    positions = rng.integers(0, window, (batch, t))
    positions[0, 0] = slots + 2  # past the end: not stored, sees every slot of the window
    positions[-1, -1] = -1  # not stored, sees none
    want_cache = [np.asarray(a, np.float32).copy() for a in cache]
    for i in range(batch):
        for j in range(t):
            if 0 <= positions[i, j] < slots:
                for stored, new in zip(want_cache, (new_k, new_v)):
                    stored[i, positions[i, j]] = np.asarray(new[i, j], np.float32)
    fn = jax.jit(cpu.decode_attention, static_argnums=5)
    got, got_cache = fn(q, new_k, new_v, cache, jnp.asarray(positions, jnp.int32), window)
    for got_array, want_array in zip(got_cache, want_cache):
        assert got_array.dtype == jnp.dtype(dtype)
        np.testing.assert_array_equal(np.asarray(got_array, np.float32), want_array)
    want = _numpy_attention(q, want_cache[0][:batch, :window], want_cache[1][:batch, :window], positions)
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5)


def test_decode_attention_updates_the_cache_in_place():
    """A decode step's cache is donated: the kernel's write must reuse its buffers, not copy them."""
    b, slots, kv_heads, head_dim = 8, 2048, 3, 64
    cache = tuple(jnp.zeros((b, slots, kv_heads, head_dim), jnp.float32) for _ in range(2))
    q = jnp.zeros((b, 1, 9, head_dim), jnp.float32)
    new = jnp.zeros((b, 1, kv_heads, head_dim), jnp.float32)
    step = jax.jit(lambda cache, q, new, pos: cpu.decode_attention(q, new, new, cache, pos, slots),
                   donate_argnums=0)
    memory = step.lower(cache, q, new, jnp.zeros((b, 1), jnp.int32)).compile().memory_analysis()
    assert memory.alias_size_in_bytes == 2 * cache[0].nbytes
    assert memory.temp_size_in_bytes < cache[0].nbytes // 8


def _greedy(model, prompt: str, n: int = 24):
    out = model.generate([prompt], max_new_tokens=n, ignore_eos=True)
    return out.tokens[0]


@pytest.fixture(scope="module")
def smollm2_bf16_weights():
    import pyllama_jax as pj

    return pj.load("smollm2-135m", param_dtype="bfloat16")  # float32 compute on bfloat16 weights


def _without_kernels(monkeypatch, fn):
    monkeypatch.setenv("PYLLAMA_CPU_KERNELS", "0")
    try:
        return fn()
    finally:
        monkeypatch.delenv("PYLLAMA_CPU_KERNELS")


def test_bf16_decode_matches_xla(smollm2_bf16_weights, monkeypatch):
    """Greedy tokens through the kernels (every decode step, the tied head included) equal XLA's."""
    import pyllama_jax as pj

    m = smollm2_bf16_weights
    prompt = "The history of the printing press begins"
    fast = _greedy(pj.Model(m.module, m.tokenizer), prompt)
    slow = _without_kernels(monkeypatch, lambda: _greedy(pj.Model(m.module, m.tokenizer), prompt))
    assert fast == slow


def test_quantized_decode_matches_xla(smollm2, monkeypatch):
    """A 4-bit g128 RTN model (float32 compute): greedy tokens through the packed kernel equal the
    dequantize-then-dot path's."""
    from flax import nnx

    import pyllama_jax as pj
    from pyllama_jax.quant.calibrate import quantize_rtn
    from pyllama_jax.quant.recipe import QuantRecipe

    m = smollm2
    recipe = QuantRecipe(wbits=4, groupsize=128, nearest=True)
    # RTN replaces linears in place: on a new module tree over the session model's arrays, not on it
    module = quantize_rtn(nnx.merge(*nnx.split(m.module)), recipe.spec)
    assert type(m.module.layers[0].attn.q).__name__ != type(module.layers[0].attn.q).__name__
    prompt = "Once upon a time"
    fast = _greedy(pj.Model(module, m.tokenizer), prompt)
    slow = _without_kernels(monkeypatch, lambda: _greedy(pj.Model(module, m.tokenizer), prompt))
    assert fast == slow


def test_float32_decode_matches_xla(smollm2, monkeypatch):
    """Float32 SmolLM2, two prompts of different lengths: greedy tokens through the attention kernel
    (every decode step) equal XLA's attention's."""
    import pyllama_jax as pj

    m = smollm2
    prompts = ["The history of the printing press begins", "Water boils at"]
    run = lambda: pj.Model(m.module, m.tokenizer).generate(prompts, max_new_tokens=24, ignore_eos=True).tokens
    calls = []
    kernel = cpu.decode_attention
    monkeypatch.setattr(cpu, "decode_attention", lambda *a: calls.append(a[0].shape) or kernel(*a))
    fast = run()
    assert (2, 1, m.config.n_heads, m.config.head_dim) in calls  # a decode step's attention ran in the kernel
    slow = _without_kernels(monkeypatch, run)
    assert fast == slow
