"""AWQ's pre-pass on one float block: input statistics over the calibration batches, every group's
scales searched on the float kernels, then folded into the block (and optionally auto-clipped).

Groups (awq.py): q/k/v after the attention norm, gate/up after the MLP norm, down after up. `o` is
skipped: under GQA several query heads read one `v` head, so `v`'s output columns cannot absorb a
scale per `o` input channel (the heads sharing a `v` head would need equal scales). All scales are computed before any fold (the
folds keep the float function, so each group's inputs are those of the float block), and down's
`1 / s` goes into up's output columns before up is quantized.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pyllama_jax.model.llama import Block
from pyllama_jax.model.qlinear import get_module
from pyllama_jax.quant.awq import AWQConfig, awq_scales, clip_scaled, fold_into_linear_out, fold_into_norm, scale_rows
from pyllama_jax.quant.gptq import HessianAccumulator
from pyllama_jax.quant.rtn import QuantSpec
from pyllama_jax.quant.taps import linear_inputs

# group name -> (the linears sharing its input, the norm absorbing 1 / s, or None: up's output columns)
AWQ_GROUPS = {"attn": (("attn.q", "attn.k", "attn.v"), "attn_norm"),
              "mlp": (("mlp.gate", "mlp.up"), "mlp_norm"),
              "down": (("mlp.down",), None)}


class InputStats:
    """The Gram matrix (as GPTQ's Hessian, `2/n x^T x`) and `mean|x|` per channel of one linear's
    inputs, accumulated batch by batch."""

    def __init__(self, dim: int):
        self.gram = HessianAccumulator(dim)
        self.abs_sum = jnp.zeros((dim,), jnp.float32)

    def add(self, x: jax.Array) -> None:
        x = jnp.asarray(x, jnp.float32).reshape(-1, self.abs_sum.shape[0])
        self.gram.add(x)
        self.abs_sum = self.abs_sum + jnp.abs(x).sum(axis=0)

    def result(self) -> tuple[jax.Array, jax.Array]:
        """(h, x_mean)."""
        return self.gram.hessian(), self.abs_sum / self.gram.tokens


def block_input_stats(layer: Block, x: np.ndarray, batches: list[slice]) -> dict[str, tuple[jax.Array, jax.Array]]:
    """(h, x_mean) of each AWQ group's input over the block inputs `x[n, t, dim]`, one batch at a time."""
    stats = {}
    for b in batches:
        acts, _ = linear_inputs(layer, jnp.asarray(x[b]))
        for group, (paths, _) in AWQ_GROUPS.items():
            a = acts[paths[0]]
            stats.setdefault(group, InputStats(a.shape[-1])).add(a)
    return {group: s.result() for group, s in stats.items()}


def _set(param, value: jax.Array) -> None:
    param[...] = value.astype(param[...].dtype)


def awq_prepass(layer: Block, x: np.ndarray, batches: list[slice], spec: QuantSpec, config: AWQConfig,
                name: str = "block") -> dict[str, tuple[jax.Array, float]]:
    """Search each group's scales on the float `layer` (block inputs `x`), fold them into it in place
    and, with `config.clip`, auto-clip the scaled kernels; returns each group's (scales, alpha)."""
    stats = block_input_stats(layer, x, batches)
    kernel = lambda path: jnp.asarray(get_module(layer, path).kernel[...], jnp.float32)
    found = {group: awq_scales(*stats[group], [kernel(p) for p in paths], spec, config, f"{name}.{group}")[:2]
             for group, (paths, _) in AWQ_GROUPS.items()}
    for group, (paths, norm) in AWQ_GROUPS.items():
        s = found[group][0]
        for p in paths:
            _set(get_module(layer, p).kernel, scale_rows(kernel(p), s))
        if norm is None:
            _set(layer.mlp.up.kernel, fold_into_linear_out(kernel("mlp.up"), s))
        else:
            scale = getattr(layer, norm).scale
            _set(scale, fold_into_norm(jnp.asarray(scale[...], jnp.float32), s))
    if config.clip:
        for group, (paths, _) in AWQ_GROUPS.items():
            clipped = clip_scaled(stats[group][0], found[group][0], [kernel(p) for p in paths], spec, config)
            for p, w in zip(paths, clipped):
                _set(get_module(layer, p).kernel, w)
    return found
