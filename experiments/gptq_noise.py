"""How much GPTQ's perplexity moves with floating-point summation order alone.

Reruns one reference-protocol GPTQ cell of `experiments/ablation.py` with another calibration batch size
(samples per forward call and per Hessian update). The algorithm, data and windows are unchanged; only the
order in which float32 partial sums are added differs. Appends a row to `experiments/results/gptq_noise.md`.

    PYLLAMA_DATA_DIR=../shared/data python experiments/gptq_noise.py --wbits=4 --groupsize=128 --batch_size=4
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))

from ablation import CALIBRATION, RESULTS, WIKI  # noqa: E402

from pyllama_jax.data.text import calibration_windows, data_dir, eval_windows  # noqa: E402
from pyllama_jax.eval.perplexity import corpus_ids, window_nlls  # noqa: E402
from pyllama_jax.quant.calibrate import CalibrationConfig, quantize_gptq  # noqa: E402
from pyllama_jax.quant.recipe import QuantRecipe  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--wbits", type=int, default=4)
    p.add_argument("--groupsize", type=int, default=128)
    p.add_argument("--calibration", default="wiki-tail", choices=sorted(CALIBRATION))
    p.add_argument("--batch_size", type=int, default=4, help="calibration samples per forward call (ablation: 8)")
    args = p.parse_args()
    import pyllama_jax as pj

    model = pj.load("smollm2-135m")
    recipe = QuantRecipe(wbits=args.wbits, groupsize=args.groupsize, nsamples=128, seqlen=512)
    calib = calibration_windows(corpus_ids(model.tokenizer, os.path.join(data_dir(), CALIBRATION[args.calibration])),
                                128, 512, 0)
    start = time.perf_counter()
    quantize_gptq(model.module, calib, recipe.spec, recipe.gptq, CalibrationConfig(args.batch_size))
    seconds = time.perf_counter() - start
    windows = eval_windows(corpus_ids(model.tokenizer, os.path.join(data_dir(), WIKI)), 512, 128)
    ppl = float(np.exp(window_nlls(model.module, windows, batch_size=8).mean()))
    row = (f"| {recipe.describe()} | {args.calibration} | {args.batch_size} | {ppl:.2f} | {seconds:.0f} s |\n")
    path = os.path.join(RESULTS, "gptq_noise.md")
    if not os.path.exists(path):
        row = ("# GPTQ perplexity under a change of float summation order only\n\n"
               "| setting | calibration | calibration batch size | perplexity | quantization time |\n"
               "|---|---|---|---|---|\n") + row
    with open(path, "a") as f:
        f.write(row)
    print(row, end="")


if __name__ == "__main__":
    main()
