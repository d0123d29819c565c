"""A PyTorch-quantized SmolLM2 evaluated by our model: is a perplexity gap in the weights or in the evaluation?

`gptq_parity.py --eval` saves the PyTorch driver's quantized linears (float32, exactly the values
its own perplexity was computed with) under `artifacts/parity/`. This puts them into our model
as dense float32 kernels and measures the perplexity on the same windows (WikiText-2 test, first
128 of 512) with our evaluation, beside the figure transformers' model gave for the same weights.

    PYLLAMA_DATA_DIR=../shared/data python experiments/cross_eval.py torch-3bit-g128-wiki-tail-order4
"""
from __future__ import annotations

import argparse
import json
import os

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

from pyllama_jax.data.text import data_dir, eval_windows
from pyllama_jax.eval.perplexity import corpus_ids, window_nlls
from pyllama_jax.model.qlinear import get_module

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", help="name of a gptq_parity.py run (results/parity/<run>.json)")
    args = p.parse_args()
    import pyllama_jax as pj

    run = json.load(open(os.path.join(REPO, "experiments", "results", "parity", f"{args.run}.json")))
    weights = load_file(os.path.join(REPO, "artifacts", "parity", f"{args.run}.safetensors"))
    model = pj.load("smollm2-135m")
    for name, w in weights.items():
        block, path = name.removeprefix("layers.").split(".", 1)
        lin = get_module(model.module.layers[int(block)], path)
        if lin.kernel.shape != w.shape:
            raise ValueError(f"{args.run}: {name} has shape {w.shape}, the model's kernel {lin.kernel.shape}")
        lin.kernel.set_value(jnp.asarray(w))
    ids = corpus_ids(model.tokenizer, os.path.join(data_dir(), "wikitext-2-raw/wiki.test.raw"))
    nlls = window_nlls(model.module, eval_windows(ids, 512, 128), batch_size=8)
    ours = float(np.exp(nlls.mean()))
    print(f"{args.run}: perplexity by transformers' model {run['perplexity']:.3f}, by ours {ours:.3f} "
          f"({ours / run['perplexity'] - 1:+.3%}; {len(nlls)} windows of 512); per-window NLLs differ by at most "
          f"{np.max(np.abs(nlls - np.asarray(run['window_nlls']))):.2e}")


if __name__ == "__main__":
    main()
