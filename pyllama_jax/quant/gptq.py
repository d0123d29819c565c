"""GPTQ (Frantar et al., 2022) in jax.numpy: the Hessian accumulator and the blocked solver.

Follows IST-DASLab's `GPTQ.fasterquant`: dead inputs, damping by `percdamp` of the mean
diagonal, the upper Cholesky factor of `H^-1`, column blocks with lazy batch updates, per-group
parameters and act-order with static groups. Weights are `[in, out]` (`y = x @ W`), so GPTQ's
"columns" are our input rows. Group parameters are found from the error-updated weights at the
group's first row (the published algorithm; the reference code reads them before the updates of
earlier rows of the same block when `groupsize` < `blocksize`).
"""
from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from pyllama_jax.model.packing import QuantWeight, group_index, pack
from pyllama_jax.quant.rtn import QuantSpec, find_params, quantize_codes

log = logging.getLogger(__name__)
HIGHEST = jax.lax.Precision.HIGHEST
DAMP_RETRIES = 3  # each retry multiplies percdamp by 10


@dataclasses.dataclass(frozen=True)
class GPTQConfig:
    """GPTQ's knobs beyond the quantization grid."""

    percdamp: float = 0.01  # damping added to H's diagonal, as a fraction of its mean
    blocksize: int = 128  # columns per lazy-update block
    act_order: bool = False  # process inputs by descending Hessian diagonal (static groups)


class HessianAccumulator:
    """`H = 2/n sum_t x_t x_t^T` over `n` calibration tokens, accumulated in float32."""

    def __init__(self, dim: int):
        self.sum = jnp.zeros((dim, dim), jnp.float32)
        self.tokens = 0

    def add(self, x: jax.Array) -> None:
        """Add a batch of activations `x[..., dim]`."""
        x = jnp.asarray(x).reshape(-1, self.sum.shape[0])
        self.sum = _add_outer(self.sum, x)
        self.tokens += x.shape[0]

    def hessian(self) -> jax.Array:
        if not self.tokens:
            raise ValueError("HessianAccumulator: no calibration activations were added")
        return self.sum * (2.0 / self.tokens)


@functools.partial(jax.jit, donate_argnums=(0,))
def _add_outer(h: jax.Array, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return h + jnp.dot(x.T, x, precision=HIGHEST)


@functools.partial(jax.jit, static_argnames=("act_order",))
def _prepare(h: jax.Array, percdamp: float, act_order: bool):
    """Dead-input fix, permutation, damping and the upper Cholesky factor of `H^-1`."""
    dead = jnp.diag(h) == 0
    h = h + jnp.diag(dead.astype(h.dtype))
    perm = jnp.argsort(-jnp.diag(h), stable=True) if act_order else jnp.arange(h.shape[0])
    h = h[perm][:, perm]
    h = h + percdamp * jnp.mean(jnp.diag(h)) * jnp.eye(h.shape[0], dtype=h.dtype)
    chol = jnp.linalg.cholesky(h)
    hinv = jax.scipy.linalg.cho_solve((chol, True), jnp.eye(h.shape[0], dtype=h.dtype))
    return dead, perm, jnp.triu(jnp.linalg.cholesky(hinv).T)


def _inverse_factor(h: jax.Array, percdamp: float, act_order: bool, name: str):
    """`_prepare`, retrying with 10x more damping while the Cholesky factorisation fails."""
    for attempt in range(DAMP_RETRIES + 1):
        damp = percdamp * 10 ** attempt
        dead, perm, hinv = _prepare(h, damp, act_order)
        if bool(jnp.all(jnp.isfinite(hinv))):
            if attempt:
                log.warning("%s: Hessian needed percdamp=%g to be positive definite", name, damp)
            return dead, perm, hinv
    raise np.linalg.LinAlgError(
        f"{name}: the Hessian is not positive definite even with percdamp={damp:g} "
        f"(tried {percdamp:g} x 10^0..{DAMP_RETRIES}); check the calibration activations for inf/NaN")


def _blocking(groupsize: int, blocksize: int, static_groups: bool) -> tuple[int, int]:
    """(block, segment) sizes such that every dynamic group starts a segment inside one block."""
    if groupsize == -1 or static_groups or groupsize % blocksize == 0:
        return blocksize, blocksize
    if groupsize > blocksize:
        return groupsize, groupsize
    return blocksize - blocksize % groupsize, groupsize


@functools.partial(jax.jit, static_argnames=("spec", "blocksize", "act_order"))
def _solve(w: jax.Array, dead: jax.Array, perm: jax.Array, hinv: jax.Array, spec: QuantSpec,
           blocksize: int, act_order: bool):
    """Blocked GPTQ over the input rows of `w[in, out]`: integer codes (natural order), scales, zeros, loss."""
    n, _ = w.shape
    maxq, gs = spec.maxq, spec.groupsize
    if gs == -1:  # per output column, from the weights before dead inputs are zeroed (as published)
        s, z = find_params(w, maxq, spec.sym, spec.mse)
        scales, zeros, gmap = s[None], z[None], jnp.zeros(n, jnp.int32)
    w = jnp.where(dead[:, None], 0.0, w)
    if gs != -1:
        n_groups = -(-n // gs)
        if act_order:  # static groups on the natural order, then permute
            params = [find_params(w[g:g + gs], maxq, spec.sym, spec.mse) for g in range(0, n, gs)]
            scales, zeros = jnp.stack([p[0] for p in params]), jnp.stack([p[1] for p in params])
            gmap = (perm // gs).astype(jnp.int32)
        else:
            scales = zeros = jnp.zeros((n_groups, w.shape[1]), w.dtype)
            gmap = jnp.arange(n, dtype=jnp.int32) // gs
    w = w[perm]
    dynamic = gs != -1 and not act_order
    block, seg = _blocking(gs, blocksize, act_order)

    codes = []
    loss = jnp.zeros((), jnp.float32)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        hinv1 = hinv[i1:i2, i1:i2]
        w1 = w[i1:i2]
        q1 = jnp.zeros(w1.shape, jnp.int32)
        e1 = jnp.zeros_like(w1)
        for g1 in range(i1, i2, seg):
            if dynamic and g1 % gs == 0:
                cur = jnp.concatenate([w1[g1 - i1:], w[i2:g1 + gs]])[:gs]
                s, z = find_params(cur, maxq, spec.sym, spec.mse)
                scales, zeros = scales.at[g1 // gs].set(s), zeros.at[g1 // gs].set(z)
            body = _column_step(hinv1, gmap[i1:i2], maxq)
            w1, q1, e1, loss, scales, zeros = jax.lax.fori_loop(
                g1 - i1, min(g1 + seg, i2) - i1, body, (w1, q1, e1, loss, scales, zeros))
        codes.append(q1)
        w = w.at[i2:].add(-jnp.dot(hinv[i1:i2, i2:].T, e1, precision=HIGHEST))
    codes = jnp.concatenate(codes)[jnp.argsort(perm)]
    return codes, scales, zeros.astype(jnp.int32), loss


def _column_step(hinv1: jax.Array, gmap1: jax.Array, maxq: int):
    """The fori_loop body quantizing row `i` of a block and spreading its error over the rest."""
    def body(i, carry):
        w1, q1, e1, loss, scales, zeros = carry
        row, d, g = w1[i], hinv1[i, i], gmap1[i]
        q = quantize_codes(row, scales[g], zeros[g], maxq)
        err = (row - scales[g] * (q - zeros[g])) / d
        w1 = w1 - hinv1[i][:, None] * err[None, :]
        return (w1, q1.at[i].set(q.astype(jnp.int32)), e1.at[i].set(err),
                loss + jnp.sum(err * err) / 2, scales, zeros)
    return body


def gptq_quantize(w: jax.Array, h: jax.Array, spec: QuantSpec, config: GPTQConfig = GPTQConfig(),
                  name: str = "weight") -> tuple[QuantWeight, float]:
    """Quantize `w[in, out]` with the Hessian `h[in, in]` of its inputs.

    Returns the packed weight and GPTQ's loss `sum (w - q)^2 / (2 [H^-1]_ii)`.
    """
    w = jnp.asarray(w, jnp.float32)
    spec.check_shape(w.shape[0], name)
    if h.shape != (w.shape[0], w.shape[0]):
        raise ValueError(f"{name}: Hessian has shape {tuple(h.shape)}, expected {(w.shape[0],) * 2}")
    dead, perm, hinv = _inverse_factor(jnp.asarray(h, jnp.float32), config.percdamp, config.act_order, name)
    codes, scales, zeros, loss = _solve(w, dead, perm, hinv, spec, config.blocksize, config.act_order)
    g_idx = group_index(w.shape[0], spec.groupsize)
    return pack(np.asarray(codes), np.asarray(scales), np.asarray(zeros), g_idx, spec.bits,
                spec.groupsize), float(loss)
