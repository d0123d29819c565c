"""The int8 KV cache against the 16-bit one: perplexity through the cache and greedy agreement.

    python benchmarks/kv_int8.py                  # SmolLM2-135M, bf16 compute, WikiText-2 test
    python benchmarks/kv_int8.py --tokens 256 --prompts 4

Perplexity feeds the first `--tokens` tokens of the corpus one at a time through the KV cache
(pyllama's `--benchmark N --check`, so every prediction reads the cache); greedy agreement
generates `--new` tokens for each of `--prompts` chat prompts with both caches and counts the
positions where the two continuations agree before they first differ.
"""
from __future__ import annotations

import argparse
import os

import pyllama_jax as pj
from pyllama_jax.eval.perplexity import benchmark, corpus_ids

PROMPTS = ["Tell me a short story about a robot who learns to paint.", "Explain what a KV cache is.",
           "Name three colours and a fruit of each.", "Write a haiku about the sea.",
           "What is the capital of France, and why is it famous?", "Give me a recipe for pancakes.",
           "Why is the sky blue?", "List the planets of the solar system."]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype (the 16-bit cache's dtype)")
    p.add_argument("--corpus", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                                                    "wikitext-2-raw", "wiki.test.raw"))
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new", type=int, default=64)
    args = p.parse_args()
    models = {kv: pj.load(args.model, dtype=args.dtype, param_dtype=args.dtype, kv_dtype=kv) for kv in ("auto", "int8")}
    ids = corpus_ids(models["auto"].tokenizer, args.corpus)[:args.tokens]
    ppl = {kv: benchmark(m.module, ids, check=True).perplexity for kv, m in models.items()}
    outs = {kv: m.generate(PROMPTS[:args.prompts], chat=True, max_new_tokens=args.new, ignore_eos=True)
            for kv, m in models.items()}
    agree = []
    for a, b in zip(outs["auto"].tokens, outs["int8"].tokens):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        agree.append(n)
    print(f"{models['auto'].describe()}; {len(ids)} tokens of {os.path.basename(args.corpus)} through the cache")
    print(f"| cache | perplexity | greedy tokens equal before the first difference ({args.prompts} prompts x {args.new}) |")
    print("|---|---|---|")
    print(f"| {args.dtype} | {ppl['auto']:.3f} | - |")
    print(f"| int8 | {ppl['int8']:.3f} ({100 * (ppl['int8'] / ppl['auto'] - 1):+.2f}%) | "
          f"{sum(agree)}/{args.prompts * args.new} (per prompt: {agree}) |")


if __name__ == "__main__":
    main()
