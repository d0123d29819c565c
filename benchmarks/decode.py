"""SmolLM2-135M decode and prefill speed: pyllama-jax against HF transformers (PyTorch), same process.

Each round runs both tools once per setting, alternating; medians over rounds and the ratio
ours/theirs are printed (ratios stay meaningful on a noisy shared CPU; absolute figures do not).

    python benchmarks/decode.py --rounds 5 --new_tokens 64
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

import pyllama_jax as pj
from pyllama_jax.api import embedded_path


def hf_model():
    from transformers import AutoModelForCausalLM

    folder, name = os.path.split(embedded_path("smollm2-135m"))
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()


def hf_decode_tps(model, ids: np.ndarray, new_tokens: int) -> float:
    """Greedy decode tokens/s of a plain KV-cached loop (prefill excluded), as ours is measured."""
    x = torch.tensor(ids)
    with torch.no_grad():
        out = model(x, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        past = out.past_key_values
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(nxt, past_key_values=past, use_cache=True)
            nxt, past = out.logits[:, -1].argmax(-1, keepdim=True), out.past_key_values
    return ids.shape[0] * (new_tokens - 1) / (time.perf_counter() - start)


def hf_prefill_tps(model, ids: np.ndarray) -> float:
    x = torch.tensor(ids)
    start = time.perf_counter()
    with torch.no_grad():
        model(x)
    return x.numel() / (time.perf_counter() - start)


def ours_decode_tps(model: pj.Model, ids: np.ndarray, new_tokens: int) -> float:
    return model.generate(ids.tolist(), max_new_tokens=new_tokens, ignore_eos=True).tokens_per_second


def ours_prefill_tps(model: pj.Model, ids: np.ndarray) -> float:
    start = time.perf_counter()
    model.logits(ids).block_until_ready()
    return ids.size / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--prompt_tokens", type=int, default=32)
    p.add_argument("--prefill_tokens", type=int, default=512)
    args = p.parse_args()

    ours, theirs = pj.load("smollm2-135m"), hf_model()
    rng = np.random.default_rng(0)
    vocab = ours.config.vocab_size
    settings = {f"decode b={b}": (rng.integers(100, vocab, (b, args.prompt_tokens)), b) for b in (1, 8)}
    settings[f"prefill {args.prefill_tokens}"] = (rng.integers(100, vocab, (1, args.prefill_tokens)), 0)
    results: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in settings}
    for name, (ids, batch) in settings.items():  # warm-up: compile every program once
        ours_decode_tps(ours, ids, 4) if batch else ours_prefill_tps(ours, ids)
    for r in range(args.rounds):
        for name, (ids, batch) in settings.items():
            if batch:
                a, b = ours_decode_tps(ours, ids, args.new_tokens), hf_decode_tps(theirs, ids, args.new_tokens)
            else:
                a, b = ours_prefill_tps(ours, ids), hf_prefill_tps(theirs, ids)
            results[name][0].append(a)
            results[name][1].append(b)
            print(f"round {r}: {name}: ours {a:.1f} tok/s, transformers {b:.1f} tok/s", flush=True)
    print(f"\nSmolLM2-135M float32, {os.cpu_count()} CPU threads, jax {__import__('jax').__version__}, "
          f"torch {torch.__version__}, medians of {args.rounds} alternating rounds")
    print(f"{'setting':<14} {'pyllama-jax tok/s':>18} {'transformers tok/s':>19} {'ratio':>6}")
    for name, (a, b) in results.items():
        ma, mb = statistics.median(a), statistics.median(b)
        print(f"{name:<14} {ma:>18.1f} {mb:>19.1f} {ma / mb:>6.2f}")


if __name__ == "__main__":
    main()
