"""A preallocated key/value cache with one write position per batch row."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pyllama_jax.model.config import ModelConfig
from pyllama_jax.sharding.rules import constrain

AXES = ("batch", "length", "kv_heads", "head_dim")  # logical axes of each k/v array (sharding rules)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Per-layer keys and values, each `[batch, length, kv_heads, head_dim]`.

    Rows are independent: token `t` of row `b` is stored at index `positions[b, t]`, and a query
    at position `p` attends to indices `<= p`. Rows of different lengths (right padding, or
    continuous batching where slots start and stop at different times) need no special casing.
    """

    k: list[jax.Array]
    v: list[jax.Array]

    @classmethod
    def create(cls, config: ModelConfig, batch: int, length: int, dtype=None) -> "KVCache":
        dtype = dtype or config.compute_dtype
        shape = (batch, length, config.kv_heads, config.head_dim)
        return cls([jnp.zeros(shape, dtype) for _ in range(config.n_layers)],
                   [jnp.zeros(shape, dtype) for _ in range(config.n_layers)])

    @property
    def length(self) -> int:
        return self.k[0].shape[1]

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]


def write(cache: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
    """Store `new[b, t]` at `cache[b, positions[b, t]]`; positions past the end are dropped."""
    rows = jnp.arange(new.shape[0])[:, None]
    return constrain(cache.at[rows, positions].set(new.astype(cache.dtype), mode="drop"), AXES)
