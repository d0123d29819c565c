"""Logical axis names -> mesh axes: the one table that lays out weights, activations and the KV cache.

Megatron-style tensor parallelism over `tensor`: q/k/v/gate/up are column-parallel (split along
their output: heads, kv_heads, mlp), o/down row-parallel (split along their input), the embedding
and output layer vocab-parallel. `fsdp` splits the model dimension of weights; activations
(`activation_*`) and the KV cache (`cache_*`) split their batch over `data` and `fsdp`, each under
names of its own, so one can be laid out without moving the others. The model code only names
logical axes.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

RULES: Rules = (
    # weights
    ("vocab", "tensor"),  # vocab-parallel embedding and lm_head
    ("heads", "tensor"),  # column-parallel q, row-parallel o
    ("kv_heads", "tensor"),  # column-parallel k and v
    ("mlp", "tensor"),  # column-parallel gate and up, row-parallel down
    ("embed", "fsdp"),  # the model dimension of weights
    ("head_dim", None),
    ("norm", None),  # RMSNorm scales
    # activations (`constrain` in model/llama.py) and input rows
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),  # the residual stream keeps its model dimension whole
    ("activation_vocab", "tensor"),  # logits, split like the output head
    ("batch", ("data", "fsdp")),  # token rows fed to the model (a training batch)
    ("length", None),
    # the KV cache (model/kv_cache.py)
    ("cache_batch", ("data", "fsdp")),
    ("cache_length", None),  # cache slots
    ("cache_heads", "tensor"),  # split by kv head, as k and v are computed
    ("cache_head_dim", None),
)

# A packed quantized weight (`pyllama_jax.model.qlinear`) shards with the dense kernel `(input, output)` it
# replaces: each dimension of each field follows the kernel's input or output axis, or its quantization
# groups, which split along the input unless a single group spans it (then every shard needs it whole).
PACKED_AXES = {"qweight": ("input", "output"), "scales": ("groups", "output"), "qzeros": ("groups", "output"),
               "g_idx": ("input",)}


def packed_axes(field: str, kernel_axes: Sequence[str | None], n_groups: int) -> tuple[str | None, ...]:
    """Logical axes of a packed weight's `field` (see `PACKED_AXES`) for a kernel with `kernel_axes`."""
    role = {"input": kernel_axes[0], "output": kernel_axes[1], "groups": kernel_axes[0] if n_groups > 1 else None}
    return tuple(role[r] for r in PACKED_AXES[field])


# Logical axis -> the ModelConfig field whose size must divide by the mesh axes it maps to.
MODEL_SIZES = {"heads": "n_heads", "kv_heads": "kv_heads", "mlp": "hidden_dim", "vocab": "vocab_size",
               "embed": "dim"}


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def _entry(axes: Sequence[str]) -> MeshAxes:
    return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


def logical_to_spec(logical: Sequence[str | None], rules: Rules = RULES) -> PartitionSpec:
    """The `PartitionSpec` of an array whose dimensions have these logical names.

    A mesh axis used by an earlier dimension is not used again (activations `[batch, length,
    embed]` split batch over `fsdp`, so embed stays whole). `None` dimensions are replicated.
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name in logical:
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(f"logical axis {name!r} has no rule in pyllama_jax.sharding.rules "
                             f"(known: {sorted(table)})")
        free = [a for a in _as_tuple(table[name]) if a not in used]
        used.update(free)
        spec.append(_entry(free))
    return PartitionSpec(*spec)


def _ways(entry: MeshAxes, mesh_shape: Mapping[str, int]) -> int:
    return math.prod(mesh_shape.get(a, 1) for a in _as_tuple(entry))


def split_ways(logical: str | None, mesh_shape: Mapping[str, int], rules: Rules = RULES) -> int:
    """Into how many parts the rules split a dimension with this logical name."""
    return _ways(logical_to_spec((logical,), rules)[0], mesh_shape)


def fit_spec(logical: Sequence[str | None], shape: Sequence[int], mesh_shape: Mapping[str, int],
             rules: Rules = RULES) -> PartitionSpec:
    """`logical_to_spec`, minus mesh axes absent from the mesh or not dividing their dimension.

    For activations and caches, whose batch may be smaller than the data axes (that part of
    the mesh then computes the rows redundantly); weights use `checked_spec` instead.
    """
    spec = []
    for n, entry in zip(shape, logical_to_spec(logical, rules)):
        keep: list[str] = []
        for a in _as_tuple(entry):
            if a in mesh_shape and n % (math.prod(mesh_shape[k] for k in keep) * mesh_shape[a]) == 0:
                keep.append(a)
        spec.append(_entry(keep))
    return PartitionSpec(*spec)


def checked_spec(name: str, logical: Sequence[str | None], shape: Sequence[int],
                 mesh_shape: Mapping[str, int], rules: Rules = RULES) -> PartitionSpec:
    """`logical_to_spec` for parameter `name`, raising if a mesh axis does not divide its dimension."""
    spec = logical_to_spec(logical, rules)
    if len(spec) != len(shape):
        raise ValueError(f"{name}: logical axes {tuple(logical)} do not match its shape {tuple(shape)}")
    for dim, (n, entry) in enumerate(zip(shape, spec)):
        if n % _ways(entry, mesh_shape):
            raise ValueError(f"{name}: dimension {dim} ({logical[dim]!r}, size {n}) cannot be split "
                             f"{_ways(entry, mesh_shape)} ways over mesh axes {_as_tuple(entry)} of mesh "
                             f"{dict(mesh_shape)}; choose mesh sizes that divide it")
    return spec


def check_model(config: Any, mesh_shape: Mapping[str, int], rules: Rules = RULES) -> None:
    """Raise if the mesh does not divide the model's heads, kv_heads, mlp, vocab or embed sizes."""
    table = dict(rules)
    for logical, field in MODEL_SIZES.items():
        size = getattr(config, field)
        axes = tuple(a for a in _as_tuple(table.get(logical)) if a in mesh_shape)
        ways = math.prod(mesh_shape[a] for a in axes)
        if size % ways:
            shown = " x ".join(f"mesh.{a}={mesh_shape[a]}" for a in axes)
            raise ValueError(f"{shown} does not divide the model's {field}={size} (logical axis "
                             f"{logical!r} is split over {axes}); choose mesh sizes that divide it")


def _name(path: Sequence[Any]) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def variable_spec(name: str, var: nnx.Variable, mesh_shape: Mapping[str, int],
                  rules: Rules = RULES) -> PartitionSpec:
    """The checked spec of one model variable from its `logical_axes` (replicated without them)."""
    value = var.get_value()
    logical = var.get_metadata().get("logical_axes") or (None,) * value.ndim
    return checked_spec(name, logical, value.shape, mesh_shape, rules)


def state_shardings(state: Any, mesh: Mesh | None, rules: Rules = RULES) -> Any:
    """A pytree of `NamedSharding` matching an `nnx.State` (None without a mesh)."""
    if mesh is None:
        return None
    return jax.tree_util.tree_map_with_path(
        lambda path, var: NamedSharding(mesh, variable_spec(_name(path), var, mesh.shape, rules)),
        state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def replicated(mesh: Mesh | None) -> NamedSharding | None:
    """The fully replicated sharding on `mesh` (None without a mesh)."""
    return None if mesh is None else NamedSharding(mesh, PartitionSpec())


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """Pin activation `x`'s layout by logical axis names; a no-op outside `jax.set_mesh(mesh)`."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, fit_spec(logical, x.shape, mesh.shape))
