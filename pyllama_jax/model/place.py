"""Putting weights and KV caches on a mesh, and jitting entry points with shardings.

Loading is streamed: `placer` hands `build_model` a function that turns one host tensor into a
sharded `jax.Array` with `jax.make_array_from_callback`, which asks only for the slices of this
process's devices. A memory-mapped checkpoint tensor is therefore read only where it is needed,
and no device or host ever holds the whole model.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from pyllama_jax.model import kv_cache
from pyllama_jax.model.config import ModelConfig
from pyllama_jax.model.kv_cache import KVCache
from pyllama_jax.model.llama import Llama, abstract_model
from pyllama_jax.model.qlinear import QuantLinear
from pyllama_jax.sharding import rules as sr


def placer(config: ModelConfig, mesh: Mesh, rules: sr.Rules = sr.RULES,
           model: Llama | None = None) -> Callable[[str, np.ndarray], jax.Array]:
    """`place(name, host_array) -> jax.Array` sharded by the rules; for `build_model(place=...)`.

    Each device's slice is cut from `host_array` (and cast to the parameter's dtype) on its own.
    `model` is the structure to fill (default: the dense model of `config`; a quantized one's packed
    arrays carry the logical axes of the kernels they replace).
    """
    model = check_layout(model if model is not None else abstract_model(config), mesh.shape, rules)
    _, state = nnx.split(model)
    targets = {}
    for path, var in nnx.to_flat_state(state):
        name = ".".join(str(p) for p in path)
        spec = sr.variable_spec(name, var, mesh.shape, rules)
        targets[name] = (NamedSharding(mesh, spec), var.get_value().dtype)

    def place(name: str, array: np.ndarray) -> jax.Array:
        sharding, dtype = targets[name]
        return jax.make_array_from_callback(array.shape, sharding,
                                            lambda index: np.asarray(array[index]).astype(dtype, copy=False))

    return place


def check_layout(model: Llama, mesh_shape: Mapping[str, int], rules: sr.Rules = sr.RULES) -> Llama:
    """Raise, naming the field or tensor, if a mesh of this shape cannot split `model` (which may be
    abstract: `nnx.eval_shape`)."""
    sr.check_model(model.config, mesh_shape, rules)
    check_groups(model, mesh_shape, rules)
    for path, var in nnx.to_flat_state(nnx.state(model)):
        sr.variable_spec(".".join(str(p) for p in path), var, mesh_shape, rules)
    return model


def check_groups(model: Llama, mesh_shape: Mapping[str, int], rules: sr.Rules = sr.RULES) -> None:
    """Raise, naming the layer, where a packed weight has no logical axes or the mesh cannot split its
    quantization groups at shard boundaries (packed words are checked like every parameter)."""
    for path, m in nnx.iter_graph(model):
        if not isinstance(m, QuantLinear):
            continue
        name = ".".join(str(p) for p in path)
        in_axis = (m.qweight.get_metadata().get("logical_axes") or (None,))[0]
        if in_axis is None:
            raise ValueError(f"{name}: a QuantLinear without logical axes cannot be placed on a mesh; make it "
                             "with `qlinear.replace_linear` (axes of the Linear it replaces) or pass `axes`")
        ways = sr.split_ways(in_axis, mesh_shape, rules)
        n_groups = m.scales.get_value().shape[0]
        if n_groups > 1 and n_groups % ways:
            raise ValueError(
                f"{name} ({m.bits}-bit, groupsize {m.groupsize}): its {n_groups} quantization groups cannot "
                f"be split {ways} ways along its {m.in_features} inputs (logical axis {in_axis!r}); choose a "
                f"groupsize giving a multiple of {ways} groups, or a mesh that splits {in_axis!r} fewer ways")


def shard(model: Llama, mesh: Mesh, rules: sr.Rules = sr.RULES) -> Llama:
    """An in-memory model (dense or quantized, e.g. just calibrated) moved onto the mesh."""
    graphdef, state = nnx.split(check_layout(model, mesh.shape, rules))
    return nnx.merge(graphdef, jax.device_put(state, sr.state_shardings(state, mesh, rules)))


@functools.lru_cache(maxsize=32)
def _cache_factory(config: ModelConfig, batch: int, length: int, mesh: Mesh,
                   rules: sr.Rules = sr.RULES) -> Callable[[], KVCache]:
    """A jitted maker of the cache, each array split by its logical axes (batch over data, heads
    over tensor; an int8 cache's scales like their codes)."""
    make = lambda: KVCache.create(config, batch, length)
    shardings = jax.tree.map(
        lambda a: NamedSharding(mesh, sr.fit_spec(kv_cache.AXES[:a.ndim], a.shape, mesh.shape, rules)),
        jax.eval_shape(make))
    return jax.jit(make, out_shardings=shardings)


def create_cache(config: ModelConfig, batch: int, length: int, mesh: Mesh | None) -> KVCache:
    """A zeroed KV cache, created in place on the mesh (each device allocates only its part)."""
    if mesh is None:
        return KVCache.create(config, batch, length)
    return _cache_factory(config, batch, length, mesh)()


def jit(fn: Callable, mesh: Mesh | None, in_shardings: Sequence[Any], out_shardings: Any,
        donate_argnums: Sequence[int] = ()) -> Callable:
    """`jax.jit(fn)` with shardings, called under `jax.set_mesh(mesh)` so the model's activation
    constraints apply; without a mesh, plain `jax.jit(fn)`."""
    if mesh is None:
        return jax.jit(fn, donate_argnums=tuple(donate_argnums))
    compiled = jax.jit(fn, in_shardings=tuple(in_shardings), out_shardings=out_shardings,
                       donate_argnums=tuple(donate_argnums))

    @functools.wraps(fn)
    def call(*args: Any) -> Any:
        with jax.sharding.set_mesh(mesh):
            return compiled(*args)

    return call
