"""Peak host memory while loading a checkpoint sharded over N processes, against one device.

    python benchmarks/sharded_load_memory.py [--processes 4] [--dim 2048] [--layers 4]

Writes a random float32 native checkpoint (memory-mapped safetensors; ~1.35 GB by default) to a
temporary folder and loads it with `pj.load`: once in one process on one device, then as an
N-process `jax.distributed` job (coordinator on 127.0.0.1, one CPU device per process, mesh
tensor=N). The parent samples every process's private resident memory (RssAnon in /proc) every
few milliseconds; "load peak" is that peak minus the process's memory just before loading.
VmHWM (peak RSS, including clean page-cache pages of the memory-mapped file that the kernel can
drop) is shown too. On CPU a device's memory is host memory, so the shards a process holds count.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MB = 2 ** 20


def _status(pid: int, field: str) -> int:
    """A `kB` field of /proc/<pid>/status, in bytes (0 once the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def write_checkpoint(folder: str, dim: int, layers: int) -> tuple[str, int]:
    """A random float32 native checkpoint; returns its path and the model's bytes."""
    from pyllama_jax.convert import native
    from pyllama_jax.model.config import preset
    from pyllama_jax.model.params import expected_shapes

    config = preset("tiny", vocab_size=32000, dim=dim, n_layers=layers, n_heads=16, n_kv_heads=16,
                    hidden_dim=int(dim * 2.75), max_seq_len=2048)
    shapes = expected_shapes(config)
    rng = np.random.default_rng(0)
    tensors = ((n, rng.standard_normal(s, np.float32) * 0.02) for n, s in shapes.items())
    path = os.path.join(folder, "model")
    native.save(path, config, tensors)
    return path, sum(int(np.prod(s)) * 4 for s in shapes.values())


def worker(path: str, n: int, pid: int, port: int) -> None:
    """Load `path` (sharded over `n` processes when n > 1) and report one JSON line."""
    import ml_collections

    from pyllama_jax.sharding import multihost

    if n > 1:
        multihost.initialize(ml_collections.ConfigDict(dict(
            coordinator_address=f"127.0.0.1:{port}", num_processes=n, process_id=pid, auto_detect=False,
            timeout_s=120)))
    import jax
    from flax import nnx

    import pyllama_jax as pj
    from pyllama_jax.sharding import mesh as pm

    mesh = pm.make_mesh(tensor=n) if n > 1 else None
    jax.devices()
    before = _status(os.getpid(), "RssAnon")
    print(json.dumps({"event": "loading", "anon_before": before}), flush=True)
    start = time.perf_counter()
    model = pj.load(path, mesh=mesh)
    arrays = jax.block_until_ready(jax.tree.leaves(nnx.state(model.module)))
    seconds = time.perf_counter() - start
    held = sum(s.data.nbytes for leaf in arrays for s in leaf.addressable_shards)
    print(json.dumps({"event": "done", "pid": pid, "seconds": seconds, "device_bytes": held,
                      "vm_hwm": _status(os.getpid(), "VmHWM")}), flush=True)


def run_job(path: str, n: int) -> list[dict]:
    """Run an `n`-process load while sampling each process's RssAnon; one result per process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", path, str(n), str(i), str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(n)]
    peaks = [0] * n
    deadline = time.monotonic() + 900
    try:
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {n}-process load did not finish within 900 s")
            for i, p in enumerate(procs):
                peaks[i] = max(peaks[i], _status(p.pid, "RssAnon"))
            time.sleep(0.003)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = []
    for i, p in enumerate(procs):
        out, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"worker {i} failed:\n{err[-3000:]}")
        events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        before, done = events[0]["anon_before"], events[-1]
        results.append({**done, "load_peak": peaks[i] - before, "anon_peak": peaks[i]})
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--processes", type=int, default=4)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--worker", nargs=4, metavar=("PATH", "N", "PID", "PORT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        path, n, pid, port = args.worker
        worker(path, int(n), int(pid), int(port))
        return
    folder = tempfile.mkdtemp(prefix="pyllama_loadmem_")
    try:
        path, model_bytes = write_checkpoint(folder, args.dim, args.layers)
        print(f"model: {model_bytes / MB:.0f} MiB float32 (dim {args.dim}, {args.layers} layers, vocab 32000)")
        print(f"{'job':<28}{'load peak MiB':>14}{'RssAnon peak':>14}{'VmHWM':>9}{'on devices':>12}{'load s':>8}")
        for n in (1, args.processes):
            for r in run_job(path, n):
                label = "1 process, 1 device" if n == 1 else f"{n} processes, process {r['pid']}"
                print(f"{label:<28}{r['load_peak'] / MB:>14.0f}{r['anon_peak'] / MB:>14.0f}"
                      f"{r['vm_hwm'] / MB:>9.0f}{r['device_bytes'] / MB:>12.0f}{r['seconds']:>8.1f}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
