"""Peak memory at load and at decode, next to the bytes the weights should take.

    python benchmarks/memory.py                                   # the full table (CPU: ~20 min)
    python benchmarks/memory.py --variants 4bit --layers 2 4 --batches 1 --context 256   # quick

Rows: 7B-shaped models (llama-7b preset, random weights as in `benchmarks/decode_7b.py`: dense
bf16, 4-bit and 3-bit g128 packed, and 3-bit with the int8 KV cache) at several depths, each saved
as a native checkpoint and loaded with `pj.load`; and the real SmolLM2-135M (float32 compute on
its Q4_1-dequantized GGUF weights, and RTN 8-bit / 4-bit g128 of them, saved then loaded).
Every measurement runs in a fresh process: load, then `--steps` greedy decode steps at each batch
size over a cache of `--context` slots (XLA quantized matmul). On CPU memory is resident set size:
load = peak RSS (`getrusage`) above the process's RSS before loading; decode = peak RSS while
decoding (the peak is reset after loading, `/proc/self/clear_refs`) above the same baseline. On a
GPU both are `peak_bytes_in_use`. The per-layer slope is a least-squares fit over the depths, and
the 32-layer figure extrapolates it (the slope includes each layer's KV cache at `--context`).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

VARIANTS = {"bf16": ("bf16", "auto"), "4bit": ("4bit", "auto"), "3bit": ("3bit", "auto"), "3bit+int8kv": ("3bit", "int8")}
SMOLLM2 = {"f32": 0, "8bit": 8, "4bit": 4}
MiB = 2 ** 20


def _rss_now() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def _peak_since_reset() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def _device_peak() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats()
    return stats.get("peak_bytes_in_use") if stats else None


def make_7b(folder: str, variant: str, layers: int, args) -> None:
    """Save the random 7B-shaped model of `decode_7b.build` as a native checkpoint."""
    from decode_7b import build

    from pyllama_jax.convert import native
    from pyllama_jax.model.params import named_tensors
    from pyllama_jax.convert.save import save_quantized

    ns = argparse.Namespace(preset="llama-7b", context=args.context, groupsize=128, kernel="xla", layers=layers)
    model = build(variant, ns)
    if variant == "bf16":
        native.save(folder, model.config, named_tensors(model))
    else:
        save_quantized(model, folder, {"recipe": {"wbits": int(variant[0]), "groupsize": 128},
                                       "made_from": {"model": "random packed words (benchmarks/decode_7b.py)"}})


def make_smollm2(folder: str, bits: int) -> None:
    import pyllama_jax as pj
    from pyllama_jax.convert.save import save_quantized

    model = pj.quantize(pj.load("smollm2-135m"), nearest=True, wbits=bits, groupsize=128)
    save_quantized(model.module, folder, {"recipe": {"wbits": bits, "groupsize": 128, "nearest": True},
                                          "made_from": {"model": "smollm2-135m"}}, model.tokenizer)


def measure(path: str, kv_dtype: str, args) -> dict:
    """Load `path` and decode; peaks above the pre-load baseline (this process only)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    jnp.zeros(1).block_until_ready()
    import pyllama_jax as pj
    from pyllama_jax.model.kv_cache import KVCache

    gpu = jax.devices()[0].platform == "gpu"
    base = _rss_now()
    start = time.perf_counter()
    model = pj.load(path, kv_dtype=kv_dtype)
    graphdef, state = nnx.split(model.module)
    jax.block_until_ready(jax.tree.leaves(state))
    out = {"load_s": time.perf_counter() - start, "weight_bytes": sum(a.nbytes for a in jax.tree.leaves(state)),
           "load": _device_peak() if gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base,
           "decode": {}}

    def step(state, cache, tokens, positions):
        logits, cache = nnx.merge(graphdef, state)(tokens[:, None], positions[:, None], cache)
        return jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32), cache

    step = jax.jit(step, donate_argnums=(1,))
    for batch in args.batches:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # restart the peak (VmHWM) from the current RSS
        cache = KVCache.create(model.config, batch, args.context)
        tokens = jnp.ones((batch,), jnp.int32)
        for i in range(args.steps):
            tokens, cache = step(state, cache, tokens, jnp.full((batch,), args.context - args.steps + i, jnp.int32))
        jax.block_until_ready(tokens)
        out["decode"][str(batch)] = _device_peak() if gpu else _peak_since_reset() - base
        out["kv_bytes"] = sum(a.nbytes for a in jax.tree.leaves(cache)) // batch
        del cache
    return out


def child(argv: list[str]) -> None:
    args = parse(argv)
    if args.make:
        kind, name, layers, folder = args.make
        (make_7b(folder, name, int(layers), args) if kind == "7b" else make_smollm2(folder, SMOLLM2[name]))
        return
    path, kv = args.measure
    print("RESULT " + json.dumps(measure(path, kv, args)), flush=True)


def run_child(argv: list[str]) -> dict | None:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(lines[0][len("RESULT "):]) if lines else None


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--layers", nargs="+", type=int, default=[2, 4, 8])
    p.add_argument("--smollm2", nargs="*", default=list(SMOLLM2), choices=list(SMOLLM2))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    p.add_argument("--context", type=int, default=2048, help="KV cache slots")
    p.add_argument("--steps", type=int, default=3, help="decode steps per batch size")
    p.add_argument("--cache_dir", default=os.path.expanduser("~/.cache/pyllama_jax/memory_bench"))
    p.add_argument("--make", nargs=4, help=argparse.SUPPRESS)
    p.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))


def main() -> None:
    args = parse(sys.argv[1:])
    if args.make or args.measure:
        return child(sys.argv[1:])
    import jax

    common = ["--batches", *map(str, args.batches), "--context", str(args.context), "--steps", str(args.steps)]
    print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}; context {args.context}, "
          f"{args.steps} decode steps, XLA quantized matmul; peaks above each process's pre-load baseline")
    rows = []
    for name in args.variants:
        weights, kv = VARIANTS[name]
        for layers in args.layers:
            folder = os.path.join(args.cache_dir, f"7b_{weights}_L{layers}_c{args.context}")
            if not os.path.isdir(folder):
                run_child(["--make", "7b", weights, str(layers), folder, *common])
            r = run_child(["--measure", folder, kv, *common])
            rows.append(dict(model=f"7B-shaped {name}", layers=layers, file=folder_bytes(folder), **r))
            print(json.dumps(rows[-1]), flush=True)
    for name in args.smollm2:
        folder = "smollm2-135m" if name == "f32" else os.path.join(args.cache_dir, f"smollm2_rtn{SMOLLM2[name]}")
        if name != "f32" and not os.path.isdir(folder):
            run_child(["--make", "smollm2", name, "0", folder, *common])
        r = run_child(["--measure", folder, "auto", *common])
        from pyllama_jax.convert.names import embedded_path

        size = os.path.getsize(embedded_path(folder)) if name == "f32" else folder_bytes(folder)
        label = "SmolLM2-135M f32 (Q4_1 GGUF, dequantized)" if name == "f32" else f"SmolLM2-135M RTN {name} g128"
        rows.append(dict(model=label, layers=30, file=size, **r))
        print(json.dumps(rows[-1]), flush=True)
    report(rows, args)


def report(rows: list[dict], args) -> None:
    mib = lambda b: f"{b / MiB:,.0f}"
    cols = " | ".join(f"decode b={b} MiB" for b in args.batches)
    print(f"\n| model | layers | weights MiB | file MiB | load peak MiB (x file) | {cols} |")
    print("|---|---|---|---|---|" + "---|" * len(args.batches))
    for r in rows:
        dec = " | ".join(mib(r["decode"][str(b)]) for b in args.batches)
        print(f"| {r['model']} | {r['layers']} | {mib(r['weight_bytes'])} | {mib(r['file'])} | "
              f"{mib(r['load'])} ({r['load'] / r['file']:.2f}x) | {dec} |")
    print(f"\nPer-layer slope (least squares over {args.layers} layers) and 32 layers at context {args.context}:")
    print("| model | weight bytes/layer MiB | KV bytes/layer/row MiB | " + " | ".join(
        f"b={b} slope MiB (x weights+KV) | b={b} 32 layers GiB" for b in args.batches) + " |")
    print("|---|---|---|" + "---|---|" * len(args.batches))
    for name in dict.fromkeys(r["model"] for r in rows if r["model"].startswith("7B")):
        group = [r for r in rows if r["model"] == name]
        if len(group) < 2:
            continue
        depth = np.array([r["layers"] for r in group], float)
        w_slope = np.polyfit(depth, [r["weight_bytes"] for r in group], 1)[0]
        kv_layer = group[0]["kv_bytes"] / group[0]["layers"]
        cells = []
        for b in args.batches:
            slope, icpt = np.polyfit(depth, [r["decode"][str(b)] for r in group], 1)
            cells += [f"{mib(slope)} ({slope / (w_slope + b * kv_layer):.2f}x)", f"{(icpt + 32 * slope) / 2 ** 30:.2f}"]
        print(f"| {name} | {mib(w_slope)} | {kv_layer / MiB:.1f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
