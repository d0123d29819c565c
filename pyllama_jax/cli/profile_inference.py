"""`pyllama-profile`: profile one generation: prefill time, per-token latency distribution, host
and device memory.

Runs the configured model (quantized as the config's `quant` section says) on the first configured
prompt twice with the same shapes (the first run compiles and is reported separately; a generation
ends at EOS or max_new_tokens), records the time and memory at every decode step of the second,
prints a table and writes `profile.png` (latency and memory per step) and `profile.json`.

    python scripts/profile_inference.py --config=configs/smollm2_135m.py --config.sampling.max_new_tokens=128 \\
        --out=artifacts/profile
"""
from __future__ import annotations

import json
import os
import sys
import time

import jax
import ml_collections
import numpy as np
import psutil
from absl import flags

import pyllama_jax as pj
from pyllama_jax.cli import job
from pyllama_jax.generate import SamplingConfig
from pyllama_jax.sections import from_section
from pyllama_jax.model.qlinear import quantized_linears


def device_bytes() -> int:
    """Device memory in use: the allocator's count where the backend has one, else live arrays."""
    stats = jax.local_devices()[0].memory_stats()
    if stats and "bytes_in_use" in stats:
        return int(stats["bytes_in_use"])
    return sum(a.nbytes for a in jax.live_arrays())


def weights_of(model: pj.Model) -> str:
    """The loaded layers' weights in words: dense and their dtype, or the quantized grids."""
    weights = quantized_linears(model.module).values()
    if not weights:
        return f"dense {model.config.param_dtype}"
    grids = sorted({(w.bits, "per-row" if w.groupsize == -1 else f"g{w.groupsize}") for w in weights})
    return ", ".join(f"{bits}-bit {g}" for bits, g in grids) + f" ({len(weights)} quantized linears)"


def run(generator, prompt: str, sampling: SamplingConfig) -> dict:
    """One generation, sampled at every step: seconds since start, host RSS and device bytes."""
    process, stats = psutil.Process(), {}
    start = time.perf_counter()
    trace = [(0.0, process.memory_info().rss, device_bytes())]
    for _ in generator.stream([prompt], sampling, stats):
        trace.append((time.perf_counter() - start, process.memory_info().rss, device_bytes()))
    t, host, device = (np.array(c) for c in zip(*trace))
    return {"prompt_tokens": stats["prompt_tokens"], "compile_s": stats["compile_seconds"],
            "prefill_s": stats["prefill_seconds"], "seconds": t[-1],
            "token_s": np.diff(t[1:]).tolist(), "host_mb": (host / 2**20).tolist(),
            "device_mb": (device / 2**20).tolist()}


def table(first: dict, p: dict) -> str:
    lat = np.array(p["token_s"]) * 1e3
    rows = [("prompt tokens", f"{p['prompt_tokens']}"),
            ("first run (compile + generate)",
             f"{first['seconds']:.2f} s, of which compile {first['compile_s']:.2f} s"),
            ("prefill (first token)", f"{p['prefill_s'] * 1e3:.1f} ms"),
            ("decode steps", f"{len(lat)}"),
            ("per-token latency mean / p50 / p90 / p99 / max",
             " / ".join(f"{v:.1f}" for v in (lat.mean(), *np.percentile(lat, [50, 90, 99]), lat.max())) + " ms"),
            ("decode throughput", f"{len(lat) / max(lat.sum() / 1e3, 1e-9):.1f} tokens/s"),
            ("host RSS start / peak / end", " / ".join(f"{v:.0f}" for v in (
                p["host_mb"][0], max(p["host_mb"]), p["host_mb"][-1])) + " MiB"),
            ("device memory start / peak / end", " / ".join(f"{v:.0f}" for v in (
                p["device_mb"][0], max(p["device_mb"]), p["device_mb"][-1])) + " MiB")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def plot(p: dict, title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ax1.plot(range(1, len(p["token_s"]) + 1), np.array(p["token_s"]) * 1e3, lw=1)
    ax1.axhline(np.median(p["token_s"]) * 1e3, color="gray", ls="--", lw=0.8, label="median")
    ax1.set_ylabel("latency per token (ms)")
    ax1.set_title(f"{title}: prefill {p['prefill_s'] * 1e3:.0f} ms")
    ax1.legend()
    steps = range(len(p["host_mb"]))
    ax2.plot(steps, p["host_mb"], label="host RSS")
    ax2.plot(steps, p["device_mb"], label="device")
    ax2.set_xlabel("decode step")
    ax2.set_ylabel("MiB")
    ax2.legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def profile(c: ml_collections.ConfigDict, out_dir: str) -> None:
    """Profile the configured model on its first prompt; write the plot and the numbers to `out_dir`."""
    try:
        model = pj.load_from_config(c)  # dense, or quantized as the config's `quant` section says
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")
    print(f"loaded {model.source}: {weights_of(model)}, {c.dtype} compute")
    prompt = c.prompts[0]
    if c.chat:
        prompt = model.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    sampling = from_section(SamplingConfig, c.sampling)
    first = run(model.generator, prompt, sampling)
    steady = run(model.generator, prompt, sampling)
    print(table(first, steady))
    os.makedirs(out_dir, exist_ok=True)
    plot(steady, f"{os.path.basename(model.source)}, {weights_of(model)}, {c.dtype}",
         os.path.join(out_dir, "profile.png"))
    out = os.path.join(out_dir, "profile.json")
    with open(out + ".tmp", "w") as f:
        json.dump({"config": c.to_dict(), "first_run": first, "profile": steady}, f, default=str)
    os.replace(out + ".tmp", out)
    print(f"wrote {out_dir}/profile.png and profile.json")


def main() -> None:
    out = flags.DEFINE_string("out", "artifacts/profile", "folder for profile.png and profile.json")
    job.run(lambda c: profile(c, out.value), "smollm2_135m.py")


if __name__ == "__main__":
    main()
