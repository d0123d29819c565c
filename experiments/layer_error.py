"""Which GPTQ options help? A cheap layer-level proxy on real SmolLM2 activations.

For every linear of blocks 0..B-1 (dense inputs, no error propagation between layers), quantize
with a Hessian from calibration windows and measure the relative output error
||X W - X Q|| / ||X W|| on held-out activations: the first WikiText-2 test windows, which
neither calibration text overlaps. Writes experiments/results/layer_error.md.

    python experiments/layer_error.py --blocks=2 --eval-windows=8
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import jax.numpy as jnp

from pyllama_jax.data.text import calibration_windows, data_dir, eval_windows
from pyllama_jax.eval.perplexity import corpus_ids
from pyllama_jax.quant.calibrate import linear_inputs
from pyllama_jax.quant.gptq import GPTQConfig, HessianAccumulator, gptq_quantize
from pyllama_jax.model.packing import dequantize
from pyllama_jax.model.qlinear import LAYER_LINEARS, get_module
from pyllama_jax.quant.rtn import QuantSpec, rtn_quantize

WIKI = os.path.join(data_dir(), "wikitext-2-raw", "wiki.test.raw")
CALIBRATION = {"wiki-tail": WIKI + "@640000:", "gutenberg": os.path.join(data_dir(), "gutenberg", "pride_and_prejudice.txt")}
VARIANTS = [  # (label, method, spec fields, gptq fields, calibration, nsamples)
    ("RTN", "rtn", {}, {}, None, 0),
    ("RTN + MSE range", "rtn", {"mse": True}, {}, None, 0),
    ("GPTQ", "gptq", {}, {}, "wiki-tail", 128),
    ("GPTQ, 32 samples", "gptq", {}, {}, "wiki-tail", 32),
    ("GPTQ, 256 samples", "gptq", {}, {}, "wiki-tail", 256),
    ("GPTQ act-order (static groups)", "gptq", {}, {"act_order": True}, "wiki-tail", 128),
    ("GPTQ + MSE range", "gptq", {"mse": True}, {}, "wiki-tail", 128),
    ("GPTQ act-order + MSE", "gptq", {"mse": True}, {"act_order": True}, "wiki-tail", 128),
    ("GPTQ, gutenberg calibration", "gptq", {}, {}, "gutenberg", 128),
]


def _inputs(model, ids: np.ndarray, blocks: int, batch: int = 8):
    """Yield, per batch of windows, each block's linear inputs `{path: [tokens, in]}` (dense model)."""
    for i in range(0, len(ids), batch):
        x = jnp.take(model.embed[...], jnp.asarray(ids[i:i + batch]), axis=0)
        out = []
        for b in range(blocks):
            acts, x = linear_inputs(model.layers[b], x)
            out.append({p: acts[p].reshape(-1, acts[p].shape[-1]) for p in LAYER_LINEARS})
        yield i + len(ids[i:i + batch]), out


def activations(model, ids: np.ndarray, blocks: int) -> list[dict[str, np.ndarray]]:
    """Per block, each linear's inputs `[tokens, in]` for windows `ids`."""
    batches = [acts for _, acts in _inputs(model, ids, blocks)]
    return [{p: np.concatenate([np.asarray(a[b][p]) for a in batches]) for p in LAYER_LINEARS} for b in range(blocks)]


def hessians(model, ids: np.ndarray, blocks: int, snapshots: tuple[int, ...]) -> dict[int, list[dict]]:
    """Hessians of each linear's inputs after the first `n` windows, for each `n` in `snapshots`."""
    accs = [{p: HessianAccumulator(get_module(model.layers[b], p).kernel[...].shape[0]) for p in LAYER_LINEARS}
            for b in range(blocks)]
    out = {}
    for seen, acts in _inputs(model, ids[:max(snapshots)], blocks):
        for b in range(blocks):
            for p in LAYER_LINEARS:
                accs[b][p].add(acts[b][p])
        if seen in snapshots:
            out[seen] = [{p: acc.hessian() for p, acc in blk.items()} for blk in accs]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=int, default=1)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--bits", type=int, nargs="*", default=[3, 4])
    ap.add_argument("--groupsize", type=int, default=128)
    args = ap.parse_args()
    import pyllama_jax as pj

    start = time.perf_counter()
    model = pj.load("smollm2-135m")
    seqlen = 512
    held_out = activations(model.module, eval_windows(corpus_ids(model.tokenizer, WIKI), seqlen, args.eval_windows),
                           args.blocks)
    H = {}
    for name, path in CALIBRATION.items():
        ids = calibration_windows(corpus_ids(model.tokenizer, path), 256, seqlen, seed=0)
        H[name] = hessians(model.module, ids, args.blocks, (32, 128, 256) if name == "wiki-tail" else (128,))
    rows = []
    for bits in args.bits:
        for label, method, spec_f, gptq_f, calib, n in VARIANTS:
            spec = QuantSpec(bits=bits, groupsize=args.groupsize, **spec_f)
            errs = []
            for b in range(args.blocks):
                for p in LAYER_LINEARS:
                    w = np.asarray(get_module(model.module.layers[b], p).kernel[...])
                    qw = rtn_quantize(w, spec) if method == "rtn" else \
                        gptq_quantize(w, H[calib][n][b][p], spec, GPTQConfig(**gptq_f))[0]
                    x = held_out[b][p]
                    ref = x @ w
                    errs.append(np.linalg.norm(x @ np.asarray(dequantize(qw)) - ref) / np.linalg.norm(ref))
            rows.append((bits, label, float(np.mean(errs))))
            print(f"{bits}-bit {label}: mean relative output error {rows[-1][2]:.5f}", flush=True)
    lines = ["# Layer-level proxy: which GPTQ options lower the output error on held-out text?", "",
             f"SmolLM2-135M-Instruct, every linear of blocks 0..{args.blocks - 1} (dense inputs), groupsize "
             f"{args.groupsize}; error = mean over the {args.blocks * 7} linears of ||XW - XQ|| / ||XW|| on the "
             f"first {args.eval_windows} WikiText-2 test windows of {seqlen} (held out). Calibration: windows of "
             f"{seqlen} drawn with seed 0. `python experiments/layer_error.py` ({time.perf_counter() - start:.0f} s "
             "on a shared 2-core CPU).", "", "| bits | method | mean relative output error | vs GPTQ (128 wiki-tail) |",
             "|---|---|---|---|"]
    for bits, label, err in rows:
        base = next(e for b, lab, e in rows if b == bits and lab == "GPTQ")
        lines.append(f"| {bits} | {label} | {err:.5f} | {100 * (err / base - 1):+.1f}% |")
    path = os.path.join(REPO, "experiments", "results", "layer_error.md")
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
