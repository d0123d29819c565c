"""The LLaMA decoder in Flax NNX: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

Weights use Hugging Face's layout: dense kernels are `[in_features, out_features]` (`y = x @ W`)
and rotary embeddings rotate the two halves of each head (not interleaved pairs, as Meta's and
GGUF files do; their converters permute q/k once at load time).
Every parameter carries `logical_axes` metadata that `pyllama_jax.sharding.rules` maps to a mesh.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from pyllama_jax.kernels import cpu as cpu_kernels
from pyllama_jax.model import kv_cache
from pyllama_jax.model.config import ModelConfig
from pyllama_jax.model.kv_cache import KVCache
from pyllama_jax.model.order import after
from pyllama_jax.sharding.rules import constrain

ACT_AXES = ("activation_batch", "activation_length", "activation_embed")  # the residual stream (sharding rules)
LOGIT_AXES = ("activation_batch", "activation_length", "activation_vocab")


def _init(rngs: nnx.Rngs, shape: tuple[int, ...], dtype, std: float = 0.02) -> jax.Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class Linear(nnx.Module):
    """A bias-free dense layer, `y = x @ kernel`; `QuantLinear` has the same call interface."""

    def __init__(self, in_features: int, out_features: int, axes: tuple[str, str], *,
                 config: ModelConfig, rngs: nnx.Rngs):
        self.kernel = nnx.Param(_init(rngs, (in_features, out_features), config.weight_dtype),
                                logical_axes=axes)
        self.dtype = config.compute_dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x, w = x.astype(self.dtype), self.kernel[...]
        if cpu_kernels.applies(x, w.dtype):  # a decode step on a CPU: read the weight as it is
            return cpu_kernels.dense_matmul(x, w).astype(self.dtype)
        return jnp.dot(x, w.astype(self.dtype))


def output_head(x: jax.Array, w: jax.Array, chunk: int = 4096, transposed: bool = False) -> jax.Array:
    """Float32 logits `x @ w` for the output head `w[dim, vocab]` (`w[vocab, dim]` if `transposed`).

    XLA's CPU backend computes a 16-bit dot in float32 and makes a float32 copy of the weight
    (0.5 GiB for LLaMA-7B's head) for it: a decode step there reads the weight as it is
    (`pyllama_jax.kernels.cpu`), and a longer input takes the vocabulary in slices made one after
    another, so one slice's copy is alive at a time. Other backends take the dot as it is.
    """
    if cpu_kernels.applies(x, w.dtype):
        return cpu_kernels.dense_matmul(x, w, transposed)
    vocab = w.shape[0 if transposed else 1]

    def dot(w: jax.Array) -> jax.Array:  # contracting the stored layout: `w.T` would be copied on a CPU
        return jax.lax.dot_general(x, w.astype(x.dtype), (((x.ndim - 1,), (1 if transposed else 0,)), ((), ())),
                                   preferred_element_type=jnp.float32)

    if jax.default_backend() != "cpu" or w.dtype == jnp.float32 or vocab <= chunk:
        return dot(w)
    parts: list[jax.Array] = []
    for start in range(0, vocab, chunk):
        part = w[start:start + chunk] if transposed else w[:, start:start + chunk]
        parts.append(dot(after(parts[-1] if parts else x, part)))
    return jnp.concatenate(parts, axis=-1)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, config: ModelConfig):
        self.scale = nnx.Param(jnp.ones((dim,), config.weight_dtype), logical_axes=("norm",))
        self.eps = config.norm_eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rope_frequencies(config: ModelConfig) -> jax.Array:
    """Inverse frequencies of the rotary embedding, with LLaMA-3.1 scaling when configured."""
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    s = config.rope_scaling
    if s is None:
        return inv_freq
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate `x[b, t, heads, head_dim]` by the angles of `positions[b, t]` (half-split layout)."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [b, t, head_dim/2]
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        c, hd = config, config.head_dim
        self.q = Linear(c.dim, c.n_heads * hd, ("embed", "heads"), config=c, rngs=rngs)
        self.k = Linear(c.dim, c.kv_heads * hd, ("embed", "kv_heads"), config=c, rngs=rngs)
        self.v = Linear(c.dim, c.kv_heads * hd, ("embed", "kv_heads"), config=c, rngs=rngs)
        self.o = Linear(c.n_heads * hd, c.dim, ("heads", "embed"), config=c, rngs=rngs)
        self.n_heads, self.kv_heads, self.head_dim = c.n_heads, c.kv_heads, hd

    def __call__(self, x: jax.Array, positions: jax.Array, inv_freq: jax.Array, mask: jax.Array,
                 kv: tuple[jax.Array, ...] | None):
        b, t, _ = x.shape
        q = self.q(x)  # k's and v's weights are made (dequantized, upcast) one after another
        k = self.k(after(q, x))
        v = self.v(after(k, x)).reshape(b, t, self.kv_heads, self.head_dim)
        q = apply_rope(q.reshape(b, t, self.n_heads, self.head_dim), positions, inv_freq)
        k = apply_rope(k.reshape(b, t, self.kv_heads, self.head_dim), positions, inv_freq)
        if kv is not None and cpu_kernels.attention_applies(q, kv):
            # a decode step on a CPU: cache write and attention in one kernel (the mask is Llama's causal one)
            out, kv = cpu_kernels.decode_attention(q, k, v, kv, positions, mask.shape[-1])
            return self.o(out.astype(kv[1].dtype).reshape(b, t, self.n_heads * self.head_dim)), kv
        if kv is not None:  # one layer's cache arrays (`KVCache.layer`); see Llama's kv_window
            kv, k, v = kv_cache.update(kv, k, v, positions, mask.shape[-1])
        q = q.reshape(b, t, self.kv_heads, self.n_heads // self.kv_heads, self.head_dim)
        if kv is None:  # keys are the input tokens and the mask is causal: skip the blocks it hides
            out = causal_attention(q, k, v, mask)
        else:
            out = attention(q, k, v, mask)
        return self.o(out.reshape(b, t, self.n_heads * self.head_dim)), kv


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention of `q[b, t, kv_heads, groups, head_dim]` over `k, v[b, s, kv_heads, head_dim]`
    where `mask[b, t, s]` allows it; `[b, t, kv_heads, groups, head_dim]`."""
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(q.shape[-1])
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, max_blocks: int = 16,
                     min_block: int = 64) -> jax.Array:
    """`attention` for a mask that hides every key after its query (`causal_mask` without a cache).

    Queries go in at most `max_blocks` blocks of at least `min_block`, each over the keys up to its
    last query, so most of the hidden upper triangle is neither multiplied nor exponentiated:
    9/16 of the work at 512 tokens, 17/32 from 1,024 on.
    """
    t = q.shape[1]
    block = max(min_block, -(-t // max_blocks))
    parts = []
    for start in range(0, t, block):
        end = min(start + block, t)
        parts.append(attention(q[:, start:end], k[:, :end], v[:, :end], mask[:, start:end, :end]))
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        c = config
        self.gate = Linear(c.dim, c.hidden_dim, ("embed", "mlp"), config=c, rngs=rngs)
        self.up = Linear(c.dim, c.hidden_dim, ("embed", "mlp"), config=c, rngs=rngs)
        self.down = Linear(c.hidden_dim, c.dim, ("mlp", "embed"), config=c, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate = jax.nn.silu(self.gate(x))
        return self.down(gate * self.up(after(gate, x)))  # one weight's working set at a time


def causal_mask(positions: jax.Array, key_length: int | None = None,
                key_valid: jax.Array | None = None, segment_ids: jax.Array | None = None) -> jax.Array:
    """`[b, t, s]` booleans: may query `t` see key `s`?

    With a cache (`key_length` given) keys are cache slots and a query sees slots up to its own
    position. Without one, keys are the `t` input tokens: causal by index, minus padding, and
    (with `segment_ids[b, t]`, packed sequences) only within the query's own segment.
    """
    if key_length is not None:
        return jnp.arange(key_length)[None, None, :] <= positions[:, :, None]
    t = positions.shape[1]
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool))[None], (positions.shape[0], t, t))
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return mask & key_valid[:, None, :] if key_valid is not None else mask


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Positions `[b, t]` that restart at 0 where each packed segment begins."""
    idx = jnp.broadcast_to(jnp.arange(segment_ids.shape[1]), segment_ids.shape)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


class Block(nnx.Module):
    """One decoder layer: `x + attn(norm(x))`, then `x + mlp(norm(x))`."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(config.dim, config=config)
        self.attn = Attention(config, rngs)
        self.mlp_norm = RMSNorm(config.dim, config=config)
        self.mlp = MLP(config, rngs)
        self.config = config

    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array | None = None,
                 kv: tuple[jax.Array, ...] | None = None):
        """`x[b, t, dim]` at `positions[b, t]`; `mask` defaults to plain causal attention."""
        if mask is None:
            mask = causal_mask(positions, kv[0].shape[1] if kv is not None else None)
        h, kv = self.attn(self.attn_norm(x), positions, rope_frequencies(self.config), mask, kv)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), kv


class Llama(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        self.config = config
        self.embed = nnx.Param(_init(rngs, (config.vocab_size, config.dim), config.weight_dtype),
                               logical_axes=("vocab", "embed"))
        self.layers = nnx.List([Block(config, rngs) for _ in range(config.n_layers)])
        self.norm = RMSNorm(config.dim, config=config)
        self.lm_head = None if config.tie_embeddings else Linear(
            config.dim, config.vocab_size, ("embed", "vocab"), config=config, rngs=rngs)

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 cache: KVCache | None = None, attention_mask: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, kv_window: int | None = None,
                 logits_at: jax.Array | None = None):
        """Logits `[b, t, vocab]` (float32) and the updated cache.

        Without a cache, `attention_mask[b, t]` (1 = real token) handles left or right padding:
        positions count real tokens only. With a cache, `positions[b, t]` are the cache slots;
        the cache may have more rows than `b` (only its first `b` are used), and `kv_window`
        limits attention to its first `kv_window` slots (continuous batching: a step over the
        active rows and the filled part of a larger cache, without copying it).
        `segment_ids[b, t]` (packed sequences; 0 = padding) keeps attention within each segment
        and restarts positions per segment. `logits_at[b]` (prefill) keeps one position per row:
        the logits are then `[b, 1, vocab]`, and the output head runs on those positions only.
        """
        if segment_ids is not None:
            attention_mask = segment_ids > 0 if attention_mask is None else attention_mask
            positions = segment_positions(segment_ids) if positions is None else positions
        if positions is None:
            if attention_mask is None:
                positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
            else:
                positions = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)
        if cache is not None:
            mask = causal_mask(positions, kv_window or cache.length)
        else:
            mask = causal_mask(positions, None, None if attention_mask is None else attention_mask > 0,
                               segment_ids)
        x = constrain(jnp.take(self.embed[...], tokens, axis=0).astype(self.config.compute_dtype), ACT_AXES)
        new_layers = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, positions, mask, None if cache is None else cache.layer(i))
            x = constrain(x, ACT_AXES)
            new_layers.append(kv)
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)
        x = self.norm(x)
        if isinstance(self.lm_head, Linear) or self.lm_head is None:
            tied = self.lm_head is None
            logits = output_head(x, self.embed[...] if tied else self.lm_head.kernel[...], transposed=tied)
        else:
            logits = self.lm_head(x)  # a wrapped head (a LoRA adapter)
        logits = constrain(logits.astype(jnp.float32), LOGIT_AXES)
        return logits, (KVCache.from_layers(new_layers) if cache is not None else None)


def init_model(config: ModelConfig, seed: int = 0) -> Llama:
    """A model with random weights (normal, std 0.02)."""
    return Llama(config, nnx.Rngs(seed))


def abstract_model(config: ModelConfig) -> Llama:
    """The model's structure with shapes only, no memory: the target a loader fills in. A new module
    each call (loaders fill it in place); tracing it takes seconds, so that is done once per config."""
    return nnx.merge(*_abstract_parts(config), copy=True)


@functools.lru_cache(maxsize=8)
def _abstract_parts(config: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    return nnx.split(nnx.eval_shape(lambda: Llama(config, nnx.Rngs(0))))
