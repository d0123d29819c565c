"""The inputs of a block's linears, tapped from the block's own forward (`Block.__call__`).

Each tap is jitted so that the part of the block after the tapped linear is not computed. The
groups of `SEQUENTIAL` share one input each; GPTQ quantizes them in this order (true-sequential).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from pyllama_jax.model.llama import Block
from pyllama_jax.model.qlinear import get_module, set_linear


class _Tap:
    """Stands in for a linear layer inside a traced block and records its input."""

    def __init__(self, inner: Callable, record: list):
        self.inner, self.record = inner, record

    def __call__(self, x: jax.Array) -> jax.Array:
        self.record.append(x)
        return self.inner(x)


def _tapped_forward(layer: Block, x: jax.Array, paths: tuple[str, ...]) -> tuple[list[jax.Array], jax.Array]:
    """The inputs reaching `layer.<path>` for each of `paths` while the block runs its own forward
    (`Block.__call__`, causal) on `x`, and the block's output. Under jit, what no returned value
    needs (the rest of the block after a tapped linear) is dead code and is not computed."""
    seen: dict[str, list] = {path: [] for path in paths}
    for path in paths:
        set_linear(layer, path, _Tap(get_module(layer, path), seen[path]))
    out, _ = layer(x, jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2]))
    return [seen[path][0] for path in paths], out


def _jit_block(fn):
    """`fn(layer, x)` jitted with the block's graphdef static, so blocks with the same quantized/dense
    structure share one compiled program."""
    run = jax.jit(lambda graphdef, state, x: fn(nnx.merge(graphdef, state), x), static_argnums=0)
    return lambda layer, x: run(*nnx.split(layer), x)


SEQUENTIAL = (("attn.k", "attn.v", "attn.q"), ("attn.o",), ("mlp.up", "mlp.gate"), ("mlp.down",))

# The input of each group of `SEQUENTIAL` (its linears share one input; the last of each group runs
# first in the block), and the block's output.
group_inputs = [_jit_block(lambda layer, x, path=paths[-1]: _tapped_forward(layer, x, (path,))[0][0])
                for paths in SEQUENTIAL]
block_out = _jit_block(lambda layer, x: layer(x, jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2]))[0])
_all_inputs = _jit_block(lambda layer, x: _tapped_forward(layer, x, tuple(p[-1] for p in SEQUENTIAL)))


def linear_inputs(layer: Block, x: jax.Array) -> tuple[dict[str, jax.Array], jax.Array]:
    """The input `[b, t, in]` of each linear of `layer` for block inputs `x`, and the block's output."""
    groups, out = _all_inputs(layer, x)
    return {path: a for paths, a in zip(SEQUENTIAL, groups) for path in paths}, out
