"""AWQ (Lin et al., 2023): activation-aware per-input-channel scales searched before round-to-nearest.

Linears that share one input `x[n, in]` (q/k/v after the attention norm, gate/up after the MLP
norm, down after up), seen through `mean|x|` per channel and the Gram matrix `h = x^T x`
(groupwise.py), get one scale vector `s = mean|x|^alpha`, floored at 1e-4 and normalised by
`sqrt(max(s) min(s))`, with alpha on the grid `0, 1/20, ..., 19/20` chosen to minimise the group's
summed output error `sum_i ||x W_i - x Q(s W_i) / s||^2`, `Q` being RTN with the recipe's spec. The
kernels' rows are multiplied by `s` (`scale_rows`) and `1/s` is folded into the operation producing
`x` (`fold_into_norm`, `fold_into_linear_out`), so the float function is unchanged. Alpha 0 is
plain RTN, so the chosen scales never do worse than RTN on `x`. Optionally (`clip=True`, AWQ's
auto-clip) each group of each scaled kernel is clamped to `[-m, m]`, with `m = max|w|` shrunk by
`i/20, i < 10`, chosen per output column to minimise that group's share of the output error.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pyllama_jax.model.packing import QuantWeight
from pyllama_jax.quant.groupwise import check_problem, error, from_groups, group_size, n_groups, to_groups
from pyllama_jax.quant.rtn import QuantSpec, fake_quantize, find_params, rtn_quantize

SCALE_FLOOR = 1e-4  # AWQ's lower clamp on mean|x|^alpha


@dataclasses.dataclass(frozen=True)
class AWQConfig:
    """AWQ's search grids."""

    n_grid: int = 20  # alphas i / n_grid, i < n_grid
    clip: bool = False  # also search a per-group clipping range (auto-clip)
    clip_grid: int = 20  # shrink steps of 1 / clip_grid
    clip_max_shrink: float = 0.5  # shrink max|w| by at most this fraction

    def __post_init__(self) -> None:
        if self.n_grid < 1 or self.clip_grid < 1:
            raise ValueError(f"n_grid={self.n_grid}, clip_grid={self.clip_grid}: expected positive integers")
        if not 0 < self.clip_max_shrink < 1:
            raise ValueError(f"clip_max_shrink={self.clip_max_shrink}: expected a fraction in (0, 1)")


@dataclasses.dataclass(frozen=True)
class AWQResult:
    """The group's quantized kernels `Q(s W_i)` and the scales whose inverse the previous op absorbs."""

    weights: tuple[QuantWeight, ...]
    scales: jax.Array  # s [in]
    alpha: float
    errors: jax.Array  # [n_grid] the group's output error at each alpha


def fold_into_norm(norm_weight: jax.Array, s: jax.Array) -> jax.Array:
    """RMSNorm weight `[in]` that feeds `x / s` to the scaled kernels."""
    return norm_weight / s


def fold_into_linear_out(w_prev: jax.Array, s: jax.Array) -> jax.Array:
    """Kernel `[in_prev, in]` of the linear producing `x` (`up` before `down`), its output columns over `s`."""
    return w_prev / s[None, :]


def scale_rows(w: jax.Array, s: jax.Array) -> jax.Array:
    """Kernel `[in, out]` with input row `i` multiplied by `s[i]`."""
    return w * s[:, None]


def group_fake_quantize(w: jax.Array, spec: QuantSpec) -> jax.Array:
    """`w[in, out]` rounded to its RTN grid, as floats (the values `rtn_quantize` stores)."""
    wg = to_groups(w, group_size(w.shape[0], spec))
    scale, zero = find_params(wg, spec.maxq, spec.sym, spec.mse)
    return from_groups(fake_quantize(wg, scale, zero, spec.maxq), w.shape[0])


def grid_fractions(grid: int, steps: int) -> np.ndarray:
    """`i / grid` for `i < steps` in float32, computed on the host (XLA may turn `/ grid` into `* (1 / grid)`)."""
    return np.arange(steps, dtype=np.float32) / np.float32(grid)


def alpha_scales(x_mean: jax.Array, alpha: jax.Array) -> jax.Array:
    """AWQ's scales for one alpha from the mean absolute activation per channel."""
    s = jnp.maximum(x_mean ** alpha, SCALE_FLOOR)
    return s / jnp.sqrt(s.max() * s.min())


@functools.partial(jax.jit, static_argnames=("spec", "n_grid"))
def search_scales(h: jax.Array, x_mean: jax.Array, kernels: tuple[jax.Array, ...], spec: QuantSpec,
                  n_grid: int):
    """(best alpha's index, its scales `[in]`, the error at every alpha `[n_grid]`)."""
    def group_error(alpha):
        s = alpha_scales(x_mean, alpha)
        return sum(error(h, w, group_fake_quantize(scale_rows(w, s), spec) / s[:, None]) for w in kernels)

    alphas = jnp.asarray(grid_fractions(n_grid, n_grid))
    errors = jax.lax.map(group_error, alphas)
    best = jnp.argmin(errors)
    return best, alpha_scales(x_mean, alphas[best]), errors


@functools.partial(jax.jit, static_argnames=("spec", "grid", "steps"))
def search_clip(h: jax.Array, w: jax.Array, spec: QuantSpec, grid: int, steps: int) -> jax.Array:
    """Per group and output column, the clipping bound `[groups, out]` minimising that group's error.

    `h` and `w` are the scaled pair (the Gram matrix of `x / s`, `s W`); bound `i` is
    `max|w| (1 - i / grid)`, `i < steps`; a group's error uses `h`'s diagonal block for its rows
    (zero-padded for the filler rows of a short last group).
    """
    gs = group_size(w.shape[0], spec)
    g, pad = n_groups(w.shape[0], gs), n_groups(w.shape[0], gs) * gs - w.shape[0]
    wg = to_groups(w, gs)  # [gs, G, out]
    blocks = jnp.pad(h, ((0, pad), (0, pad))).reshape(g, gs, g, gs)[np.arange(g), :, np.arange(g)]  # [G, gs, gs]
    top = jnp.abs(wg).max(axis=0)
    keep = jnp.asarray(np.float32(1) - grid_fractions(grid, steps))

    def step(i, carry):
        best_err, best_bound = carry
        bound = top * keep[i]
        clipped = jnp.clip(wg, -bound, bound)
        scale, zero = find_params(clipped, spec.maxq, spec.sym, spec.mse)
        q = fake_quantize(clipped, scale, zero, spec.maxq)
        e = q - wg
        err = jnp.sum(e * jnp.einsum("gkl,lgo->kgo", blocks, e, precision=jax.lax.Precision.HIGHEST), axis=0)
        better = err < best_err
        return jnp.where(better, err, best_err), jnp.where(better, bound, best_bound)

    _, bound = jax.lax.fori_loop(0, steps, step, (jnp.full_like(top, jnp.inf), top))
    return bound


def awq_scales(h: jax.Array, x_mean: jax.Array, kernels: Sequence[jax.Array], spec: QuantSpec,
               config: AWQConfig = AWQConfig(), name: str = "awq group") -> tuple[jax.Array, float, jax.Array]:
    """The group's scales `s[in]`, their alpha and the error at every alpha (`search_scales`, inputs checked).

    `h[in, in]` is the Gram matrix of the group's float inputs `x` and `x_mean[in]` their mean
    absolute value per channel (any positive multiple of either gives the same result).
    """
    h, x_mean = jnp.asarray(h, jnp.float32), jnp.asarray(x_mean, jnp.float32)
    kernels = tuple(jnp.asarray(w, jnp.float32) for w in kernels)
    check_problem(h, kernels, spec, name)
    if x_mean.shape != (h.shape[0],):
        raise ValueError(f"{name}: x_mean has shape {tuple(x_mean.shape)}, expected ({h.shape[0]},), "
                         "the mean |x| of each input channel")
    best, s, errors = search_scales(h, x_mean, kernels, spec, config.n_grid)
    return s, float(np.asarray(best)) / config.n_grid, errors


def clip_scaled(h: jax.Array, s: jax.Array, scaled: Sequence[jax.Array], spec: QuantSpec,
                config: AWQConfig = AWQConfig()) -> list[jax.Array]:
    """Auto-clip: each scaled kernel `s W` `[in, out]` with every group clamped to its `search_clip` bound,
    `h` being the Gram matrix of the unscaled inputs `x` (the kernels see `x / s`)."""
    gs, hs = group_size(h.shape[0], spec), h / (s[:, None] * s[None, :])
    steps = int(config.clip_max_shrink * config.clip_grid)

    def clip(w: jax.Array) -> jax.Array:
        bound = search_clip(hs, w, spec, config.clip_grid, steps)
        return from_groups(jnp.clip(to_groups(w, gs), -bound, bound), w.shape[0])

    return [clip(w) for w in scaled]


def awq_quantize(h: jax.Array, x_mean: jax.Array, kernels: Sequence[jax.Array], spec: QuantSpec,
                 config: AWQConfig = AWQConfig(), name: str = "awq group") -> AWQResult:
    """Search the group's scales (`awq_scales`; and clipping, `clip_scaled`), then RTN-quantize each
    `s W_i` into a `QuantWeight`; the caller folds `1 / result.scales` into the op producing `x`."""
    s, alpha, errors = awq_scales(h, x_mean, kernels, spec, config, name)
    scaled = [scale_rows(jnp.asarray(w, jnp.float32), s) for w in kernels]
    if config.clip:
        scaled = clip_scaled(jnp.asarray(h, jnp.float32), s, scaled, spec, config)
    weights = tuple(rtn_quantize(w, spec, f"{name}[{i}]") for i, w in enumerate(scaled))
    return AWQResult(weights, s, alpha, errors)
