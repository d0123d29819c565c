"""Quantized matmul speed on LLaMA-7B shapes: bf16 `jnp.dot`, the XLA dequantize-then-dot path,
and the Pallas kernel, in the same process.

    python benchmarks/qmatmul.py                       # GPU: 4-bit g128, M in 1 4 16 64 256 2048
    python benchmarks/qmatmul.py --bits 3 --m 1 16 --tune
    python benchmarks/qmatmul.py --interpret --m 1 4 --shapes 4096x4096 --rounds 3 --calls 4 --mem_gib 2  # CPU

Every timed program makes `--calls` matmuls over rotating copies of the weights and inputs (more
bytes than the GPU's L2 holds) so each call reads from DRAM; the three paths alternate within each
round and the medians over `--rounds` are reported. GB/s counts the bytes a call must move (weight
arrays, x, y); `%bw` is of the device's peak memory bandwidth (`--peak_gbps` or a table of known
GPUs). Before timing, the kernel's output is compared with the XLA path's (`relerr`).
Without a GPU the kernel only runs under `--interpret`: checked, not timed (the other two are).
"""
from __future__ import annotations

import argparse
import functools
import itertools
import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from pyllama_jax.kernels import dequant_matmul as dm
from pyllama_jax.model.packing import QuantWeight, dequantize, group_index

PEAK_GBPS = {"H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H100 NVL": 3900, "H200": 4800, "GH200": 4000,
             "A100-SXM4-80GB": 2039, "A100-SXM4-40GB": 1555, "A100-PCIE-40GB": 1555, "A100 80GB PCIe": 1935,
             "L40S": 864, "L4": 300, "A10": 600, "RTX 4090": 1008}
L2_BYTES = 64 << 20  # at least the L2 of current data-centre GPUs (H100: 50 MiB)


def random_quant_weight(key: jax.Array, k: int, n: int, bits: int, groupsize: int) -> QuantWeight:
    """Random packed words, zero points and float16 scales on the default device.

    As fast as real codes (the kernel's work does not depend on their values) and never
    materializes a dense weight.
    """
    kq, ks, kz = jax.random.split(key, 3)
    n_groups = 1 if groupsize == -1 else k // groupsize
    words = lambda key, shape: jax.lax.bitcast_convert_type(jax.random.bits(key, shape, jnp.uint32), jnp.int32)
    return QuantWeight(
        qweight=words(kq, (k * bits // 32, n)),
        scales=jax.random.uniform(ks, (n_groups, n), jnp.float16, 0.5 / 2 ** bits, 2.0 / 2 ** bits),
        qzeros=words(kz, (n_groups, n * bits // 32)),
        g_idx=jnp.asarray(group_index(k, groupsize)), bits=bits, groupsize=groupsize, in_features=k)


def nbytes(tree) -> int:
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))


def peak_gbps(override: float | None) -> float:
    if override:
        return override
    kind = jax.devices()[0].device_kind
    return next((v for name, v in PEAK_GBPS.items() if name in kind), float("nan"))


def rotating_program(fn, args: list, calls: int):
    """A jitted program making `calls` calls of `fn`, cycling through the argument copies."""
    @jax.jit
    def run(args):
        return [fn(*args[i % len(args)]) for i in range(calls)]
    return lambda: run(args)


def time_program(run) -> float:
    start = time.perf_counter()
    jax.block_until_ready(run())
    return time.perf_counter() - start


def copies_for(bytes_per_copy: int, mem_bytes: float) -> int:
    """Enough argument copies to cycle through twice the L2, within the memory budget."""
    return max(2, min(math.ceil(2 * L2_BYTES / bytes_per_copy), int(mem_bytes // bytes_per_copy)))


def bench_shape(k: int, n: int, m: int, args, key, kernel_only: bool = False) -> dict:
    """Median seconds per call of each path, bytes per call, the kernel's config and error.

    Off GPU the kernel is only checked (interpreted), and the other two paths are timed.
    """
    bits, gs = args.bits, args.groupsize
    gpu = jax.default_backend() == "gpu"
    kq, kd = jax.random.split(key)
    qw0 = random_quant_weight(kq, k, n, bits, gs)
    x_bytes, y_bytes = m * k * 2, m * n * 2
    dense_bytes, q_bytes = k * n * 2, nbytes(qw0)
    budget = args.mem_gib * 2 ** 30 / 3
    nq, nd = copies_for(q_bytes + x_bytes, budget), copies_for(dense_bytes + x_bytes, budget)
    keys = jax.random.split(kd, max(nq, nd))
    xs = [jax.random.normal(c, (m, k), jnp.bfloat16) for c in keys]
    qws = [qw0] + [random_quant_weight(c, k, n, bits, gs) for c in keys[1:nq]]
    config = dm.default_config(m, k, n, bits) if args.config is None else args.config
    reason = dm.supports(qw0, (m, k), config=config, interpret=True)
    kernel = None if reason else functools.partial(dm.dequant_matmul, config=config, interpret=not gpu)
    xla = lambda x, qw: jnp.dot(x, dequantize(qw, x.dtype))
    out = dict(config=config, reason=reason, bytes=dict(bf16=dense_bytes + x_bytes + y_bytes,
                                                        kernel=q_bytes + x_bytes + y_bytes))
    if kernel is not None and not kernel_only:
        y, ref = jax.jit(kernel)(xs[0], qws[0]), jax.jit(xla)(xs[0], qws[0])
        out["relerr"] = float(jnp.abs(y.astype(jnp.float32) - ref.astype(jnp.float32)).max()
                              / jnp.abs(ref.astype(jnp.float32)).max())
    calls = max(nq, nd, min(args.calls, int(budget // y_bytes)))
    progs = {}
    if not kernel_only:
        ws = [jax.random.normal(c, (k, n), jnp.bfloat16) for c in keys[:nd]]
        progs.update(bf16=rotating_program(jnp.dot, list(zip(xs, ws)), calls),
                     xla=rotating_program(xla, list(zip(xs, qws)), calls))
    if kernel is not None and gpu:
        progs["kernel"] = rotating_program(kernel, list(zip(xs, qws)), calls)
    for run in progs.values():  # compile and warm up
        time_program(run)
    times = {name: [] for name in progs}
    for _ in range(args.rounds):
        for name, run in progs.items():
            times[name].append(time_program(run) / calls)
    out["seconds"] = {name: statistics.median(t) for name, t in times.items()}
    return out


def tune(k: int, n: int, m: int, args, key) -> list[tuple[float, dm.TileConfig]]:
    """Kernel seconds per call for a small sweep of tile configs (GPU only), fastest first."""
    per = dm.period(args.bits)[0]
    base = dm.default_config(m, k, n, args.bits)
    gemv = base.block_m < dm.MIN_DOT
    stages = (base.num_stages,) if gemv else (2, 3, 4)  # Triton pipelines only the dot path's loads
    found = []
    for bn, rows, split, warps, st in itertools.product((32, 64, 128), (4, 8, 16, 32, 64), (1, 2, 4, 8, 16),
                                                         (2, 4, 8), stages):
        c = dm.TileConfig(base.block_m, bn, rows * per, split, warps, st)
        if dm.check_config(c, m, k, n, args.bits) is None and (not gemv or base.block_m * rows * bn <= 4096):
            found.append(c)
    rng = np.random.default_rng(0)
    picks = [base] + [found[i] for i in rng.choice(len(found), min(args.tune, len(found)), replace=False)]
    results = []
    for c in picks:
        sub = argparse.Namespace(**{**vars(args), "config": c, "rounds": 3})
        try:
            r = bench_shape(k, n, m, sub, key, kernel_only=True)
            results.append((r["seconds"]["kernel"], c))
        except Exception as e:  # a config Triton cannot compile (registers, shared memory)
            print(f"    {c}: {type(e).__name__}: {str(e)[:120]}")
    return sorted(results, key=lambda t: t[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["4096x4096", "4096x11008", "11008x4096"], help="KxN")
    p.add_argument("--m", nargs="+", type=int, default=[1, 4, 16, 64, 256, 2048])
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--groupsize", type=int, default=128)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--calls", type=int, default=100, help="matmuls per timed program")
    p.add_argument("--mem_gib", type=float, default=8.0, help="device memory for weight copies and outputs")
    p.add_argument("--peak_gbps", type=float, default=None)
    p.add_argument("--tune", type=int, default=0, help="also time this many random tile configs per case")
    p.add_argument("--interpret", action="store_true", help="off GPU: check the interpreted kernel")
    args = p.parse_args()
    args.config = None
    gpu = jax.default_backend() == "gpu"
    if not gpu and not args.interpret:
        p.error("the kernel needs a GPU; pass --interpret to check it (untimed) and time the others here")
    peak = peak_gbps(args.peak_gbps)
    print(f"device: {jax.devices()[0].device_kind}, peak {peak:.0f} GB/s; jax {jax.__version__}; "
          f"{args.bits}-bit g{args.groupsize}")
    print("| K x N | M | bf16 us | bf16 %bw | xla-dequant us | kernel us | kernel GB/s | kernel %bw | "
          "vs bf16 | vs xla | relerr | config |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    key = jax.random.key(0)
    for shape in args.shapes:
        k, n = map(int, shape.split("x"))
        for m in args.m:
            key, sub = jax.random.split(key)
            r = bench_shape(k, n, m, args, sub)
            t = r.get("seconds", {})
            us = lambda name: f"{t[name] * 1e6:.1f}" if name in t else "n/a"
            kern = t.get("kernel")
            gbps = r["bytes"]["kernel"] / kern / 1e9 if kern else float("nan")
            bf16_bw = 100 * r["bytes"]["bf16"] / t["bf16"] / 1e9 / peak
            c = r["config"]
            cfg = "n/a: " + r["reason"] if r["reason"] else (
                f"bm{c.block_m} bn{c.block_n} bk{c.block_k} s{c.split_k} w{c.num_warps}")
            ratio = lambda name: f"{t[name] / kern:.2f}x" if kern and name in t else "n/a"
            err = f"{r['relerr']:.1e}" if "relerr" in r else "n/a"
            print(f"| {k}x{n} | {m} | {us('bf16')} | {bf16_bw:.0f} | {us('xla')} | {us('kernel')} | {gbps:.0f} | "
                  f"{100 * gbps / peak:.0f} | {ratio('bf16')} | {ratio('xla')} | {err} | {cfg} |", flush=True)
            if args.tune and gpu and not r["reason"]:
                for secs, c in tune(k, n, m, args, sub)[:3]:
                    print(f"    tuned {secs * 1e6:.1f} us: {c}")


if __name__ == "__main__":
    main()
