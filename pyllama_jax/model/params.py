"""Canonical parameter names and building a model from a stream of named tensors.

Every converter yields `(name, array)` pairs with names like `layers.3.attn.q.kernel` (the
model's own attribute paths) in our layout (kernels `[in, out]`, half-split RoPE). Tensors are
placed one at a time, so host memory never holds two copies of a model.
"""
from __future__ import annotations

import functools
from typing import Callable, Iterable, Iterator

import jax
import numpy as np
from flax import nnx

from pyllama_jax.model.config import ModelConfig
from pyllama_jax.model.llama import Llama, abstract_model

LAYER_LINEARS = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter of a model with this config."""
    return dict(_shapes(config))


@functools.lru_cache(maxsize=8)
def _shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    _, state = nnx.split(abstract_model(config))
    return {".".join(str(k) for k in path): tuple(v.get_value().shape)
            for path, v in nnx.to_flat_state(state)}


def permute_rope(w: np.ndarray, n_heads: int, to_half_split: bool) -> np.ndarray:
    """Convert q/k output rows `[n_heads*head_dim, in]` between interleaved and half-split RoPE.

    Meta's and GGUF's weights rotate pairs `(2i, 2i+1)`; ours (and HF's) rotate `(i, i+hd/2)`.
    """
    out, inp = w.shape
    hd = out // n_heads
    if to_half_split:
        return w.reshape(n_heads, hd // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)
    return w.reshape(n_heads, 2, hd // 2, inp).swapaxes(1, 2).reshape(out, inp)


def build_model(config: ModelConfig, tensors: Iterable[tuple[str, np.ndarray]], source: str,
                place: Callable[[str, np.ndarray], jax.Array] | None = None,
                model: Llama | None = None) -> Llama:
    """Fill a model with `config`'s structure from named tensors.

    `source` names the checkpoint in errors. `model` is the abstract structure to fill
    (`nnx.eval_shape`; default: the dense model of `config`; a quantized one declares its packed
    arrays); each tensor must match its shape. `place(name, array)` puts one tensor on devices
    (default: the default device, cast to the structure's dtype); sharded loading passes its own.
    """
    graphdef, state = nnx.split(abstract_model(config) if model is None else model)
    flat = {".".join(str(k) for k in path): var for path, var in nnx.to_flat_state(state)}
    place = place or (lambda name, a: jax.device_put(a.astype(flat[name].get_value().dtype, copy=False), may_alias=True))
    seen: set[str] = set()
    for name, array in tensors:
        if name not in flat:
            raise ValueError(f"{source}: unexpected tensor {name!r} for a model with {config.n_layers} "
                             f"layers (tie_embeddings={config.tie_embeddings})")
        shape = tuple(flat[name].get_value().shape)
        if tuple(array.shape) != shape:
            raise ValueError(f"{source}: tensor {name!r} has shape {tuple(array.shape)}, expected "
                             f"{shape} from the model config")
        flat[name].set_value(place(name, np.asarray(array)))
        seen.add(name)
    missing = sorted(set(flat) - seen)
    if missing:
        raise ValueError(f"{source}: missing {len(missing)} tensor(s), e.g. {missing[:3]}")
    return nnx.merge(graphdef, state)


def named_tensors(model: Llama) -> Iterator[tuple[str, np.ndarray]]:
    """The model's parameters as `(name, host array)` pairs, one at a time (for exporters)."""
    _, state = nnx.split(model)
    for path, var in nnx.to_flat_state(state):
        yield ".".join(str(k) for k in path), np.asarray(jax.device_get(var.get_value()))
