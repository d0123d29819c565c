"""SignRound / AutoRound (Cheng et al., 2023): rounding offsets learned by signed gradient descent.

Per linear `y = x @ W`, `W[in, out]`, a rounding offset `V` in `[-0.5, 0.5]` (the shape of `W`) and
optionally per group and output column the clipping factors `alpha` (of the max) and `beta` (of the
min) in `[0.5, 1]` are learned: the grid is `find_params` (rtn.py) of the range
`[beta min(W, 0), alpha max(W, 0)]`, `Wq = scale (clip(round(W / scale + V) + zero, 0, maxq) - zero)`.
The loss `||x W - x Wq||^2`, computed as `tr(E^T h E)` from the Gram matrix `h = x^T x`
(groupwise.py; any positive multiple gives the same iterates), is minimised by
`p <- clip(p - lr_t sign(dL/dp))` for `steps` steps, `lr_t = lr (1 - t / steps)` (AutoRound's linear
decay), rounding and clipping passed straight through (the clip's gradient is 1 inside `[0, maxq]`,
bounds included, 0 outside) and the zero point's rounding given no gradient. The iterate of lowest
loss wins; iterate 0 (`V = 0`, `alpha = beta = 1`) is RTN, so the result never does worse than RTN
on `x`.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pyllama_jax.model.packing import QuantWeight, group_index, pack
from pyllama_jax.quant.groupwise import check_problem, error, from_groups, group_size, n_groups, to_groups
from pyllama_jax.quant.rtn import QuantSpec, _div, find_params

CLIP_RANGE = (0.5, 1.0)  # bounds of the learned alpha, beta
V_RANGE = (-0.5, 0.5)


@dataclasses.dataclass(frozen=True)
class SignRoundConfig:
    """Signed gradient descent's knobs."""

    steps: int = 200
    lr: float | None = None  # None: 1 / steps
    learn_clip: bool = True  # also learn alpha, beta

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps={self.steps!r}: expected a positive integer")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr={self.lr!r}: expected a positive step size or None (1 / steps)")

    @property
    def step_size(self) -> float:
        return 1.0 / self.steps if self.lr is None else self.lr


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Rounding:
    """Learned rounding of one kernel: offsets `v[in, out]`, clipping `alpha`, `beta` `[groups, out]`."""

    v: jax.Array
    alpha: jax.Array
    beta: jax.Array


def grid(w: jax.Array, alpha: jax.Array, beta: jax.Array, spec: QuantSpec) -> tuple[jax.Array, jax.Array]:
    """Scale and zero `[groups, out]` of `w[in, out]`'s groups with the range clipped by `alpha`, `beta`."""
    wg = to_groups(w, group_size(w.shape[0], spec))
    hi = alpha * jnp.maximum(wg.max(axis=0), 0.0)
    lo = beta * jnp.minimum(wg.min(axis=0), 0.0)
    return find_params(jnp.stack([hi, lo]), spec.maxq, spec.sym, False)


def _codes(w: jax.Array, r: Rounding, scale: jax.Array, zero: jax.Array, spec: QuantSpec) -> jax.Array:
    """Codes `[gs, groups, out]` (floats), rounding and clipping passed straight through."""
    gs, maxq = group_size(w.shape[0], spec), spec.maxq
    u = _div(to_groups(w, gs), scale) + to_groups(r.v, gs)
    q = u + jax.lax.stop_gradient(jnp.round(u) - u) + zero
    return jnp.where((q >= 0) & (q <= maxq), q, jax.lax.stop_gradient(jnp.clip(q, 0, maxq)))


def dequantize_rounding(w: jax.Array, r: Rounding, spec: QuantSpec) -> jax.Array:
    """`Wq[in, out]` of the rounding `r` (differentiable in `r`)."""
    scale, zero = grid(w, r.alpha, r.beta, spec)
    return from_groups(scale * (_codes(w, r, scale, zero, spec) - zero), w.shape[0])


@functools.partial(jax.jit, static_argnames=("spec", "steps", "learn_clip"))
def learn_rounding(h: jax.Array, w: jax.Array, spec: QuantSpec, steps: int, lr: float,
                   learn_clip: bool) -> tuple[Rounding, jax.Array]:
    """The rounding of lowest loss among iterates `0 .. steps - 1`, and that loss."""
    ones = jnp.ones((n_groups(w.shape[0], group_size(w.shape[0], spec)), w.shape[1]), jnp.float32)
    loss_and_grad = jax.value_and_grad(lambda r: error(h, w, dequantize_rounding(w, r, spec)))

    def step(t, carry):
        r, best, best_loss = carry
        loss, g = loss_and_grad(r)
        better = loss < best_loss
        best = jax.tree.map(lambda a, b: jnp.where(better, a, b), r, best)
        lr_t = lr * (1.0 - t / steps)
        v = jnp.clip(r.v - lr_t * jnp.sign(g.v), *V_RANGE)
        if learn_clip:
            r = Rounding(v, jnp.clip(r.alpha - lr_t * jnp.sign(g.alpha), *CLIP_RANGE),
                         jnp.clip(r.beta - lr_t * jnp.sign(g.beta), *CLIP_RANGE))
        else:
            r = Rounding(v, r.alpha, r.beta)
        return r, best, jnp.minimum(loss, best_loss)

    init = Rounding(jnp.zeros_like(w), ones, ones)
    _, best, best_loss = jax.lax.fori_loop(0, steps, step, (init, init, jnp.asarray(jnp.inf, jnp.float32)))
    return best, best_loss


def rounding_codes(w: jax.Array, r: Rounding, spec: QuantSpec) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Integer codes `[in, out]`, scales and integer zeros `[groups, out]`, as `rtn.py` produces them."""
    scale, zero = grid(w, r.alpha, r.beta, spec)
    codes = from_groups(_codes(w, r, scale, zero, spec), w.shape[0])
    return codes.astype(jnp.int32), scale, zero.astype(jnp.int32)


def signround_quantize(h: jax.Array, w: jax.Array, spec: QuantSpec, config: SignRoundConfig = SignRoundConfig(),
                       name: str = "weight") -> QuantWeight:
    """Quantize `w[in, out]` with rounding learned on the Gram matrix `h[in, in]` of its inputs,
    packed as `rtn_quantize` packs."""
    h, w = jnp.asarray(h, jnp.float32), jnp.asarray(w, jnp.float32)
    check_problem(h, (w,), spec, name)
    if spec.mse:
        raise ValueError(f"{name}: mse=True is not supported by SignRound, which learns its own clipping; "
                         "expected mse=False")
    r, _ = learn_rounding(h, w, spec, config.steps, config.step_size, config.learn_clip)
    codes, scales, zeros = rounding_codes(w, r, spec)
    return pack(np.asarray(codes), np.asarray(scales), np.asarray(zeros),
                group_index(w.shape[0], spec.groupsize), spec.bits, spec.groupsize)
