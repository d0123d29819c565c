"""The device mesh: axes `data`, `fsdp` and `tensor`, sized from the job config's `mesh` section."""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
from jax.sharding import AxisType, Mesh

AXES = ("data", "fsdp", "tensor")


def resolve_shape(sizes: Sequence[int], n_devices: int) -> tuple[int, ...]:
    """Mesh axis sizes for `sizes` (one per `AXES`; at most one -1 = "the rest of the devices").

    Without -1 the mesh may use fewer devices than present (the first ones); never more.
    """
    names = [f"mesh.{a}" for a in AXES]
    desc = ", ".join(f"{n}={s}" for n, s in zip(names, sizes))
    if len(sizes) != len(AXES):
        raise ValueError(f"expected {len(AXES)} mesh sizes ({', '.join(names)}), got {len(sizes)}")
    bad = [n for n, s in zip(names, sizes) if not isinstance(s, int) or (s < 1 and s != -1)]
    if bad:
        raise ValueError(f"{', '.join(bad)} must be a positive integer or -1 (the rest); got {desc}")
    if list(sizes).count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1 (the rest of the devices); got {desc}")
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % fixed:
            raise ValueError(f"{desc}: the {n_devices} devices present do not divide evenly by {fixed}")
        sizes = [n_devices // fixed if s == -1 else s for s in sizes]
    if math.prod(sizes) > n_devices:
        raise ValueError(f"{desc} requests {math.prod(sizes)} devices but only {n_devices} are present "
                         f"({jax.default_backend()} backend, {jax.process_count()} process(es))")
    return tuple(sizes)


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A `jax.make_mesh` over `devices` (default: all) with axes `data`, `fsdp`, `tensor`.

    In a multi-process job the mesh must span every device, so each process holds a part.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_shape((data, fsdp, tensor), len(devices))
    n = math.prod(shape)
    if jax.process_count() > 1 and n != len(devices):
        raise ValueError(f"mesh {dict(zip(AXES, shape))} covers {n} of the {len(devices)} devices of this "
                         f"{jax.process_count()}-process job; a multi-process mesh must use all of them "
                         "(set one mesh axis to -1)")
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices[:n])


def from_config(mesh_config: Any) -> Mesh | None:
    """The mesh of a config's `mesh` section, or None for a single device in a single process."""
    mesh = make_mesh(mesh_config.data, mesh_config.fsdp, mesh_config.tensor)
    return None if mesh.size == 1 and jax.process_count() == 1 else mesh


def describe(mesh: Mesh) -> str:
    """`data=2 x fsdp=1 x tensor=4 (8 cpu devices, 1 process)`."""
    axes = " x ".join(f"{a}={s}" for a, s in mesh.shape.items())
    return f"{axes} ({mesh.size} {mesh.devices.flat[0].platform} devices, {jax.process_count()} process(es))"
