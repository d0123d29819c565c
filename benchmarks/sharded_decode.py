"""Decode tokens/s of a sharded model at batch 1 and 16 on 1, 2, 4 and 8 devices.

    python benchmarks/sharded_decode.py [--rounds 3] [--steps 32]

One process; on a CPU-only machine it simulates 8 devices (all sharing the same cores, so CPU
figures only show that every layout compiles and runs, not a speed-up). On a machine with
several accelerators it uses them. Layouts: tensor-parallel `(1, 1, n)` at batch 1 and 16, and
data-parallel `(n, 1, 1)` at batch 16. Configurations alternate within each round; the table
shows the median over rounds and the ratio to one device.
"""
from __future__ import annotations

import argparse
import os
import statistics

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402  (after XLA_FLAGS)
import numpy as np  # noqa: E402

from pyllama_jax.generate import Generator, SamplingConfig  # noqa: E402
from pyllama_jax.model.config import preset  # noqa: E402
from pyllama_jax.model.llama import init_model  # noqa: E402
from pyllama_jax.sharding import mesh as pm  # noqa: E402
from pyllama_jax.model import place  # noqa: E402
from pyllama_jax.tokenizer import Tokenizer  # noqa: E402

CONFIG = preset("tiny", vocab_size=8192, dim=512, n_layers=4, n_heads=8, n_kv_heads=8, hidden_dim=1536,
                max_seq_len=256)
NO_VOCAB = Tokenizer(None, "ids", None, None, False)  # token-id prompts, no end-of-sequence token


def decode_rate(gen: Generator, prompts: list[list[int]], steps: int) -> float:
    """Tokens per second over all rows, decode steps only (prefill excluded)."""
    stats: dict = {}
    for _ in gen.stream(prompts, SamplingConfig(max_new_tokens=steps), stats):
        pass
    return len(prompts) * stats["decode_steps"] / stats["decode_seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=32, help="tokens generated per row")
    args = ap.parse_args()
    devices = jax.devices()
    counts = [n for n in (1, 2, 4, 8) if n <= len(devices)]
    print(f"{len(devices)} {devices[0].platform} devices ({devices[0].device_kind}); model dim {CONFIG.dim}, "
          f"{CONFIG.n_layers} layers, {CONFIG.num_params() / 1e6:.0f}M params, float32")
    model = init_model(CONFIG, seed=0)
    rng = np.random.default_rng(0)
    prompts = {b: [list(rng.integers(0, CONFIG.vocab_size, 8)) for _ in range(b)] for b in (1, 16)}
    runs = {}  # (layout, devices, batch) -> generator
    for n in counts:
        for layout, batch in (("tensor", 1), ("tensor", 16), ("data", 16)):
            sizes = (1, 1, n) if layout == "tensor" else (n, 1, 1)
            mesh = pm.make_mesh(*sizes)
            gen = Generator(place.shard(model, mesh), NO_VOCAB, mesh)
            decode_rate(gen, prompts[batch], args.steps)  # compile
            runs[layout, n, batch] = gen
    rates: dict = {k: [] for k in runs}
    for _ in range(args.rounds):
        for key, gen in runs.items():
            rates[key].append(decode_rate(gen, prompts[key[2]], args.steps))
    print(f"{'layout':<8}{'devices':>8}{'batch':>6}{'tok/s':>10}{'vs 1 device':>13}")
    for (layout, n, batch), r in rates.items():
        med, base = statistics.median(r), statistics.median(rates[layout, 1, batch])
        print(f"{layout:<8}{n:>8}{batch:>6}{med:>10.1f}{med / base:>12.2f}x")


if __name__ == "__main__":
    main()
