"""Group-wise views of `[in, out]` kernels and the input checks shared by the calibration-aware
quantizers (AWQ, SignRound).

A group is `groupsize` consecutive input rows (all of them for `groupsize=-1`), as in `rtn.py`;
these methods need the groups to tile the rows exactly, so `groupsize` must divide `in`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pyllama_jax.quant.rtn import QuantSpec


def check_problem(x, kernels, spec: QuantSpec, name: str) -> None:
    """Raise one ValueError naming the field when `x[n, in]` cannot feed every kernel `[in, out]`."""
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"{name}: x has shape {tuple(x.shape)}, expected [tokens, in] with at least one token")
    if not kernels:
        raise ValueError(f"{name}: kernels is empty, expected at least one [in, out] kernel")
    for i, w in enumerate(kernels):
        if w.ndim != 2 or w.shape[0] != x.shape[1]:
            raise ValueError(f"{name}: x has width {x.shape[1]} but kernel {i} has shape {tuple(w.shape)}, "
                             f"expected [{x.shape[1]}, out]")
    spec.check_shape(x.shape[1], name)
    if spec.groupsize != -1 and x.shape[1] % spec.groupsize:
        raise ValueError(f"{name}: groupsize={spec.groupsize} does not divide its {x.shape[1]} input "
                         f"features; expected -1 or a divisor of {x.shape[1]}")


def group_size(in_features: int, spec: QuantSpec) -> int:
    """Rows per group."""
    return in_features if spec.groupsize == -1 else spec.groupsize


def to_groups(w: jax.Array, gs: int) -> jax.Array:
    """`w[in, out]` -> `[gs, in / gs, out]`: `rtn.find_params` reduces axis 0, giving `[groups, out]`.

    (Not `vmap` over groups: batching moves `rtn._div`'s barrier off the divisor, and XLA then
    divides by a constant as a multiply by its reciprocal, which moves rounding ties.)
    """
    return w.reshape(w.shape[0] // gs, gs, w.shape[1]).transpose(1, 0, 2)


def from_groups(w: jax.Array) -> jax.Array:
    """Inverse of `to_groups`."""
    return w.transpose(1, 0, 2).reshape(-1, w.shape[-1])


def error(x: jax.Array, w: jax.Array, w_hat: jax.Array) -> jax.Array:
    """Output error `||x w - x w_hat||^2`, summed."""
    e = jnp.dot(x, w - w_hat, precision=jax.lax.Precision.HIGHEST)
    return jnp.sum(e * e)
