"""GPTQ's uniform quantizer and round-to-nearest (RTN) quantization, in jax.numpy.

Weights are `[in, out]`; each output column (optionally each group of `groupsize` input rows)
gets a scale and an integer zero point from its min/max, with the range forced to include 0
(IST-DASLab `quant.py`, `Quantizer.find_params` with `perchannel=True`), optionally shrunk by
a grid search minimising the `|w - q|^2.4` error (`mse=True`).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pyllama_jax.model.packing import QuantWeight, check_bits, group_index, pack

MSE_NORM, MSE_GRID, MSE_MAXSHRINK = 2.4, 100, 0.8


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How to quantize a weight (the fields GPTQ's scripts take)."""

    bits: int = 4  # 2, 3, 4 or 8
    groupsize: int = -1  # input rows sharing scale/zero; -1 = one set per output column
    sym: bool = False  # symmetric grid (zero fixed at the middle)
    mse: bool = False  # grid-search a shrunk range minimising the quantization error

    def __post_init__(self) -> None:
        check_bits(self.bits, "wbits")
        if not isinstance(self.groupsize, (int, np.integer)) or (self.groupsize != -1 and self.groupsize < 1):
            raise ValueError(f"groupsize={self.groupsize!r}: expected -1 (per output row) or a positive integer")

    @property
    def maxq(self) -> int:
        return 2 ** self.bits - 1

    def check_shape(self, in_features: int, name: str = "weight") -> None:
        """Raise if `groupsize` cannot split `in_features` input rows."""
        if self.groupsize > in_features:
            raise ValueError(f"{name}: groupsize={self.groupsize} exceeds its {in_features} input features")


def _div(a: jax.Array, b) -> jax.Array:
    """`a / b` as IEEE division, like GPTQ's PyTorch code.

    The barrier keeps XLA from rewriting it as `a * (1 / b)`, whose rounding moves ties.
    """
    return a / jax.lax.optimization_barrier(jnp.broadcast_to(jnp.asarray(b, a.dtype), a.shape))


def find_params(x: jax.Array, maxq: int, sym: bool, mse: bool) -> tuple[jax.Array, jax.Array]:
    """Scale and zero point `[out]` for the rows `x[k, out]` (reduced over axis 0)."""
    xmin = jnp.minimum(x.min(axis=0), 0.0)
    xmax = jnp.maximum(x.max(axis=0), 0.0)
    if sym:
        xmax = jnp.maximum(jnp.abs(xmin), xmax)
        xmin = jnp.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin, xmax = jnp.where(empty, -1.0, xmin), jnp.where(empty, 1.0, xmax)
    scale = _div(xmax - xmin, maxq)
    zero = jnp.full_like(scale, (maxq + 1) / 2) if sym else jnp.round(_div(-xmin, scale))
    if not mse:
        return scale, zero

    def step(i, carry):
        best, scale, zero = carry
        p = 1.0 - i / MSE_GRID
        scale1 = _div(p * xmax - p * xmin, maxq)
        zero1 = zero if sym else jnp.round(_div(-(p * xmin), scale1))
        err = jnp.sum(jnp.abs(fake_quantize(x, scale1, zero1, maxq) - x) ** MSE_NORM, axis=0)
        better = err < best
        return (jnp.where(better, err, best), jnp.where(better, scale1, scale),
                jnp.where(better, zero1, zero))

    init = (jnp.full_like(scale, jnp.inf), scale, zero)
    _, scale, zero = jax.lax.fori_loop(0, int(MSE_MAXSHRINK * MSE_GRID), step, init)
    return scale, zero


def quantize_codes(x: jax.Array, scale: jax.Array, zero: jax.Array, maxq: int) -> jax.Array:
    """Integer codes (as floats) `clamp(round(x / scale) + zero, 0, maxq)`.

    A symmetric grid puts the group's extreme weight exactly on a rounding tie.
    """
    return jnp.clip(jnp.round(_div(x, scale)) + zero, 0, maxq)


def fake_quantize(x: jax.Array, scale: jax.Array, zero: jax.Array, maxq: int) -> jax.Array:
    """`x` rounded to its grid, as floats."""
    return scale * (quantize_codes(x, scale, zero, maxq) - zero)


@functools.partial(jax.jit, static_argnames=("spec",))
def _rtn(w: jax.Array, spec: QuantSpec):
    n = w.shape[0]
    gs = n if spec.groupsize == -1 else spec.groupsize
    scales, zeros, codes = [], [], []
    for g1 in range(0, n, gs):
        s, z = find_params(w[g1:g1 + gs], spec.maxq, spec.sym, spec.mse)
        scales.append(s)
        zeros.append(z)
        codes.append(quantize_codes(w[g1:g1 + gs], s, z, spec.maxq))
    return (jnp.concatenate(codes).astype(jnp.int32), jnp.stack(scales),
            jnp.stack(zeros).astype(jnp.int32))


def rtn_quantize(w: jax.Array, spec: QuantSpec, name: str = "weight") -> QuantWeight:
    """Round-to-nearest quantization of a dense `w[in, out]` into a packed `QuantWeight`."""
    spec.check_shape(w.shape[0], name)
    codes, scales, zeros = _rtn(jnp.asarray(w, jnp.float32), spec)
    return pack(np.asarray(codes), np.asarray(scales), np.asarray(zeros),
                group_index(w.shape[0], spec.groupsize), spec.bits, spec.groupsize)
