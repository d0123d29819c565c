"""A preallocated key/value cache with one write position per batch row."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pyllama_jax.model.config import ModelConfig
from pyllama_jax.sharding.rules import constrain

AXES = ("cache_batch", "cache_length", "cache_heads", "cache_head_dim")  # each k/v array (sharding rules)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Per-layer keys and values, each `[batch, length, kv_heads, head_dim]`.

    Rows are independent: token `t` of row `b` is stored at index `positions[b, t]`, and a query
    at position `p` attends to indices `<= p`. Rows of different lengths (right padding, or
    continuous batching where slots start and stop at different times) need no special casing.
    An int8 cache (`ModelConfig.kv_dtype="int8"`) stores codes in `k`/`v` and one float32 scale
    per position and head in `k_scale`/`v_scale` (`[batch, length, kv_heads]`): half a bf16
    cache's bytes, plus 4 per 128-wide head.
    """

    k: list[jax.Array]
    v: list[jax.Array]
    k_scale: list[jax.Array] | None = None
    v_scale: list[jax.Array] | None = None

    @classmethod
    def create(cls, config: ModelConfig, batch: int, length: int, dtype=None) -> "KVCache":
        shape = (batch, length, config.kv_heads, config.head_dim)
        layers = range(config.n_layers)
        if config.kv_dtype == "int8" and dtype is None:
            return cls([jnp.zeros(shape, jnp.int8) for _ in layers], [jnp.zeros(shape, jnp.int8) for _ in layers],
                       [jnp.ones(shape[:3], jnp.float32) for _ in layers],
                       [jnp.ones(shape[:3], jnp.float32) for _ in layers])
        dtype = dtype or config.compute_dtype
        return cls([jnp.zeros(shape, dtype) for _ in layers], [jnp.zeros(shape, dtype) for _ in layers])

    @property
    def length(self) -> int:
        return self.k[0].shape[1]

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    def layer(self, i: int) -> tuple[jax.Array, ...]:
        """Layer `i`'s arrays: `(k, v)`, or `(k, v, k_scale, v_scale)` for an int8 cache."""
        return (self.k[i], self.v[i]) if self.k_scale is None else (
            self.k[i], self.v[i], self.k_scale[i], self.v_scale[i])

    @classmethod
    def from_layers(cls, layers: list[tuple[jax.Array, ...]]) -> "KVCache":
        """Inverse of `layer` over every layer."""
        return cls(*[list(arrays) for arrays in zip(*layers)])


def write(cache: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
    """Store `new[b, t]` at `cache[b, positions[b, t]]`; positions past the end are dropped.

    Each row's `positions[b]` are consecutive slots (`start + arange(t)`), as every caller writes:
    one in-place `dynamic_update_slice` per row, which reads that row's old slots first (to keep
    those a block shifted back to fit must not change). XLA's CPU backend keeps the update in place
    only for one form of that read per dtype (through a slice of the row for bfloat16, directly for
    float32, float16 and int8); the other form, and a scatter, copy the whole cache (2.25x its bytes
    at batch 8 for float32, 1.3 ms a layer at 256 slots).
    """
    length, t = cache.shape[1], new.shape[1]
    new = new.astype(cache.dtype)
    if t > length:  # more tokens than slots: only a scatter can drop the overflow
        rows = jnp.arange(new.shape[0])[:, None]
        return constrain(cache.at[rows, positions].set(new, mode="drop"), AXES[:cache.ndim])
    tail = (0,) * (cache.ndim - 2)
    for r in range(new.shape[0]):
        start = positions[r, 0]
        begin = jnp.clip(start, 0, length - t)  # where the block fits; slots before `start` keep
        index = begin + jnp.arange(t) - start  # their values, tokens past the end are dropped
        if cache.dtype == jnp.bfloat16:
            old = jax.lax.dynamic_slice_in_dim(jax.lax.dynamic_slice_in_dim(cache, r, 1, 0), begin, t, 1)
        else:
            old = jax.lax.dynamic_slice(cache, (r, begin) + tail, (1, t) + cache.shape[2:])
        valid = ((index >= 0) & (index < t)).reshape((1, t) + (1,) * (cache.ndim - 2))
        block = jnp.where(valid, jnp.take(new[r:r + 1], jnp.clip(index, 0, t - 1), axis=1), old)
        cache = jax.lax.dynamic_update_slice(cache, block, (r, begin) + tail)
    return constrain(cache, AXES[:cache.ndim])


def quantize_int8(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 codes of `x[..., head_dim]` and their float32 scales `[...]` (absmax / 127)."""
    xf = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(xf), axis=-1) / 127.0
    codes = jnp.round(xf / jnp.where(scale == 0, 1.0, scale)[..., None])
    return jnp.clip(codes, -127, 127).astype(jnp.int8), scale


def update(layer: tuple[jax.Array, ...], k: jax.Array, v: jax.Array, positions: jax.Array,
           window: int) -> tuple[tuple[jax.Array, ...], jax.Array, jax.Array]:
    """Write `k`/`v` `[b, t, kv_heads, head_dim]` at `positions` into one layer's cache arrays;
    returns the new arrays and the keys and values of the first `b` rows' first `window` slots,
    in `k`'s dtype (an int8 cache is dequantized here, one layer at a time)."""
    b = k.shape[0]
    if len(layer) == 2:
        layer = (write(layer[0], k, positions), write(layer[1], v, positions))
        return layer, layer[0][:b, :window], layer[1][:b, :window]
    (kq, ks), (vq, vs) = quantize_int8(k), quantize_int8(v)
    layer = tuple(write(a, new, positions) for a, new in zip(layer, (kq, vq, ks, vs)))
    read = lambda q, s: (q[:b, :window].astype(jnp.float32) * s[:b, :window, :, None]).astype(k.dtype)
    return layer, read(layer[0], layer[2]), read(layer[1], layer[3])
