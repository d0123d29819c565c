"""Ordering computations that XLA would otherwise schedule early (and keep alive at once)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def after(x: jax.Array, value: jax.Array) -> jax.Array:
    """`value` unchanged, but computed only once `x` is.

    XLA computes expressions of the weights alone wherever its scheduler likes; on CPU it drops
    `optimization_barrier` before scheduling and puts every layer's dequantization up front, so
    all dense weights are live at once. Selecting on a predicate of `x` that is always true (a
    float is finite, NaN or infinite) but that XLA cannot prove true orders it after `x`. Applied
    to every packed array, it also keeps XLA from sharing a weight-only part (the gathered scales)
    between the forward and backward passes, which would keep it alive in between.
    """
    first = x.reshape(-1)[0]
    return jnp.where(jnp.isfinite(first) | jnp.isnan(first) | jnp.isinf(first), value, jnp.zeros_like(value))
