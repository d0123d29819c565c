"""7B-shaped LLaMA decoding: bf16 weights against 4-bit and 3-bit g128 packed weights (Pallas kernel).

    python benchmarks/decode_7b.py                                   # GPU: bf16, 4bit, 3bit; batch 1, 16
    python benchmarks/decode_7b.py --variants 4bit --batches 1 --steps 32
    python benchmarks/decode_7b.py --preset tiny --context 128 --groupsize 32 --steps 4   # CPU smoke run

Random weights, no checkpoint. Each variant runs in its own subprocess, so the device's
`peak_bytes_in_use` is that variant's own peak (weights, KV cache, compiled programs' buffers),
read after each batch size. Quantized variants never hold the bf16 weights: the model is built
abstractly, embedding, norms and lm_head get random bf16 values, and every layer linear becomes a
`QuantLinear` over random packed words (as fast as RTN codes of random weights; the text is noise).
Decode: one jitted token step over a KV cache of `--context` slots (attention reads all of them),
timed over `--steps` steps after warm-up; tokens/s = batch * steps / seconds.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from pyllama_jax.model.config import preset
from pyllama_jax.model.kv_cache import KVCache
from pyllama_jax.model.llama import Llama, abstract_model, init_model
from pyllama_jax.model.qlinear import LAYER_LINEARS, QuantLinear, get_module, set_linear

from qmatmul import nbytes, random_quant_weight

BITS = {"4bit": 4, "3bit": 3}


def build(variant: str, args) -> Llama:
    """The model of `variant` ("bf16", "4bit", "3bit") with random weights on the default device."""
    depth = {"n_layers": args.layers} if getattr(args, "layers", None) else {}
    config = preset(args.preset, dtype="bfloat16", param_dtype="bfloat16", max_seq_len=args.context, **depth)
    if variant == "bf16":
        return init_model(config)
    model = abstract_model(config)
    key = jax.random.key(0)
    for i in range(config.n_layers):
        for name in LAYER_LINEARS:
            path = f"layers.{i}.{name}"
            k, n = get_module(model, path).kernel.shape
            key, sub = jax.random.split(key)
            qw = random_quant_weight(sub, k, n, BITS[variant], args.groupsize)
            set_linear(model, path, QuantLinear(qw, config.compute_dtype, args.kernel))
    graphdef, state = nnx.split(model)
    keys = iter(jax.random.split(key, 4 * config.n_layers + 8))

    def fill(a):  # the remaining abstract parameters: norms (1-D) get ones, matrices N(0, 0.02)
        if not isinstance(a, jax.ShapeDtypeStruct):
            return a
        if a.ndim == 1:
            return jnp.ones(a.shape, a.dtype)
        return (0.02 * jax.random.normal(next(keys), a.shape, jnp.float32)).astype(a.dtype)

    return nnx.merge(graphdef, jax.tree.map(fill, state))


def decode_tps(model: Llama, batch: int, args) -> float:
    """Greedy decode tokens/s with the cache `--context` slots long."""
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, donate_argnums=(1,))
    def step(state, cache, tokens, positions):
        logits, cache = nnx.merge(graphdef, state)(tokens[:, None], positions[:, None], cache)
        return jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32), cache

    cache = KVCache.create(model.config, batch, args.context)
    tokens = jnp.ones((batch,), jnp.int32)
    pos = args.context - args.steps - args.warmup - 1
    for _ in range(args.warmup):
        tokens, cache = step(state, cache, tokens, jnp.full((batch,), pos, jnp.int32))
        pos += 1
    jax.block_until_ready(tokens)
    start = time.perf_counter()
    for _ in range(args.steps):
        tokens, cache = step(state, cache, tokens, jnp.full((batch,), pos, jnp.int32))
        pos += 1
    jax.block_until_ready(tokens)
    return batch * args.steps / (time.perf_counter() - start)


def peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return stats.get("peak_bytes_in_use") if stats else None


def run_variant(variant: str, args) -> dict:
    model = build(variant, args)
    out = dict(variant=variant, weight_bytes=nbytes(nnx.state(model)), tps={}, peak={})
    for b in args.batches:
        out["tps"][b] = decode_tps(model, b, args)
        out["peak"][b] = peak_bytes()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["bf16", "4bit", "3bit"], choices=["bf16", *BITS])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    p.add_argument("--preset", default="llama-7b")
    p.add_argument("--context", type=int, default=2048, help="KV cache slots")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the preset's)")
    p.add_argument("--groupsize", type=int, default=128)
    p.add_argument("--kernel", default="pallas", choices=["pallas", "xla"], help="quantized matmul")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_variant(args.variants[0], args)), flush=True)
        return
    print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}; {args.preset}, context {args.context}, "
          f"g{args.groupsize}, kernel {args.kernel}, {args.steps} steps")
    results = []
    for v in args.variants:
        argv = [a for a in sys.argv[1:] if a != "--child"]
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--variants", v, "--child"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{v}: failed (exit {proc.returncode})\n{proc.stderr[-3000:]}")
            continue
        results.append(json.loads(lines[0][len("RESULT "):]))
    base = next((r for r in results if r["variant"] == "bf16"), None)
    gib = lambda b: f"{b / 2 ** 30:.2f}" if b is not None else "n/a"
    print("| variant | weights GiB | " + " | ".join(f"b={b} tok/s | b={b} vs bf16 | b={b} peak GiB"
                                                   for b in args.batches) + " |")
    print("|---|---|" + "---|---|---|" * len(args.batches))
    for r in results:
        cells = []
        for b in map(str, args.batches):
            ratio = f"{r['tps'][b] / base['tps'][b]:.2f}x" if base else "n/a"
            cells += [f"{r['tps'][b]:.1f}", ratio, gib(r["peak"][b])]
        print(f"| {r['variant']} | {gib(r['weight_bytes'])} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
