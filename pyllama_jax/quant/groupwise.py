"""Group-wise views of `[in, out]` kernels, the output error and the input checks shared by the
calibration-aware quantizers (AWQ, SignRound).

Both see a linear's calibration inputs `x[n, in]` only through the Gram matrix `h = x^T x` (any
positive multiple serves, e.g. GPTQ's `HessianAccumulator.hessian()`): `||x e||^2 = tr(e^T h e)`,
so a step costs `in^2 out` whatever the number of tokens.

A group is `groupsize` consecutive input rows (all of them for `groupsize=-1`), the last one
possibly shorter (576 rows in groups of 128), as in `rtn.py`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pyllama_jax.quant.rtn import QuantSpec


def check_problem(h, kernels, spec: QuantSpec, name: str) -> None:
    """Raise one ValueError naming the field when the Gram matrix `h[in, in]` cannot go with every
    kernel `[in, out]`, or `spec`'s groups do not fit `in`."""
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"{name}: h has shape {tuple(h.shape)}, expected a square [in, in] Gram matrix of the inputs")
    if not kernels:
        raise ValueError(f"{name}: kernels is empty, expected at least one [in, out] kernel")
    for i, w in enumerate(kernels):
        if w.ndim != 2 or w.shape[0] != h.shape[0]:
            raise ValueError(f"{name}: h is {h.shape[0]} x {h.shape[0]} but kernel {i} has shape "
                             f"{tuple(w.shape)}, expected [{h.shape[0]}, out]")
    spec.check_shape(h.shape[0], name)


def group_size(in_features: int, spec: QuantSpec) -> int:
    """Rows per group."""
    return in_features if spec.groupsize == -1 else spec.groupsize


def n_groups(in_features: int, gs: int) -> int:
    """Groups of `gs` rows covering `in_features` rows, the last one possibly short."""
    return -(-in_features // gs)


def to_groups(w: jax.Array, gs: int) -> jax.Array:
    """`w[in, out]` -> `[gs, groups, out]`: `rtn.find_params` reduces axis 0, giving `[groups, out]`.

    A short last group is filled up with copies of the last row, which leave its min and max as
    they are; `from_groups` drops them. (Not `vmap` over groups: batching moves `rtn._div`'s
    barrier off the divisor, and XLA then divides by a constant as a multiply by its reciprocal,
    which moves rounding ties.)
    """
    n = w.shape[0]
    w = jnp.pad(w, ((0, n_groups(n, gs) * gs - n), (0, 0)), mode="edge")
    return w.reshape(-1, gs, w.shape[1]).transpose(1, 0, 2)


def from_groups(w: jax.Array, in_features: int) -> jax.Array:
    """Inverse of `to_groups`: the first `in_features` rows."""
    return w.transpose(1, 0, 2).reshape(-1, w.shape[-1])[:in_features]


def error(h: jax.Array, w: jax.Array, w_hat: jax.Array) -> jax.Array:
    """Output error `tr(e^T h e)`, `e = w - w_hat`: `||x w - x w_hat||^2` for `h = x^T x`."""
    e = w - w_hat
    return jnp.sum(e * jnp.dot(h, e, precision=jax.lax.Precision.HIGHEST))
