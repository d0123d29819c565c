"""Multi-process jobs: `jax.distributed` set up from the config's `distributed` section or the
usual environment variables, and output from process 0 only.

The same config runs on 1 or N hosts: with no coordinator configured the job is one process.
Call `initialize` before anything else touches JAX's devices.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import time
from typing import Any, Callable

import jax

ENV = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID"}


@dataclasses.dataclass(frozen=True)
class Cluster:
    """Where this process sits in a multi-process job."""

    coordinator_address: str  # "host:port" of process 0
    num_processes: int
    process_id: int


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "")
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def resolve(dist: Any) -> Cluster | None:
    """The job's layout from `dist` (a config's `distributed` section), then the environment.

    None for a single-process job (nothing configured, or one process).
    """
    address = dist.coordinator_address or os.environ.get(ENV["coordinator_address"], "")
    n = dist.num_processes if dist.num_processes > 0 else _env_int(ENV["num_processes"])
    pid = dist.process_id if dist.process_id >= 0 else _env_int(ENV["process_id"])
    if not address and n is None and pid is None:
        return None
    given = {"coordinator_address": address or None, "num_processes": n, "process_id": pid}
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise ValueError("a multi-process job needs " + ", ".join(
            f"distributed.{k} (or ${ENV[k]})" for k in missing) + f"; got {given}")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"distributed.coordinator_address={address!r}: expected 'host:port'")
    if not 0 <= pid < n:
        raise ValueError(f"distributed.process_id={pid} must lie in [0, num_processes={n})")
    return None if n == 1 else Cluster(address, n, pid)


def wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Return once `host:port` accepts TCP connections; ConnectionError after `timeout_s` seconds.

    (JAX aborts the whole process when it cannot reach the coordinator; this fails cleanly first.)
    """
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise ConnectionError(f"the coordinator at {address} (distributed.coordinator_address) did not "
                                      f"answer within {timeout_s:g} s ({e}); start process 0 first and check "
                                      "the host, port and firewall") from None
            time.sleep(0.2)


def initialize(dist: Any) -> bool:
    """Join the multi-process job that `dist` or the environment describes; False if single-process.

    With `dist.auto_detect`, JAX finds the layout itself (SLURM, Open MPI, Kubernetes, Cloud TPU).
    """
    if dist.auto_detect:
        jax.distributed.initialize(initialization_timeout=int(dist.timeout_s))
        return True
    cluster = resolve(dist)
    if cluster is None:
        return False
    if cluster.process_id != 0:
        wait_for_coordinator(cluster.coordinator_address, dist.timeout_s)
    jax.distributed.initialize(cluster.coordinator_address, cluster.num_processes, cluster.process_id,
                               initialization_timeout=int(dist.timeout_s))
    return True


def is_main() -> bool:
    """Whether this is process 0, the one that prints and writes files."""
    return jax.process_index() == 0


def main_only(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` on process 0, a no-op elsewhere (e.g. `say = main_only(print)`)."""
    return fn if is_main() else (lambda *args, **kwargs: None)
