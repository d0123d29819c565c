"""How far floating-point rounding alone moves a GPTQ perplexity on SmolLM2-135M.

Reruns a calibrated row of an `ablation.py` grid (default: the reference table) in variants that compute the same mathematics:
- `order<seed>`: the calibration windows in a shuffled order, so every Hessian sums the same
  terms in another order;
- `batch<n>`: block activations computed n calibration windows at a time instead of 8;
- `hf-ids`: the windows cut from transformers' GGUF tokenizer's ids, the reference's exact input
  (a few ids differ from ours, see `README.md`).
The spread of these runs is the noise floor against which a 1% match to the reference, or a method's
gain, can be judged. Each variant is saved under `experiments/results/spread/` and skipped when
rerun; the reference rows' table goes to `experiments/results/gptq_spread.md`, and every grid's
reruns join its means in `ablation.py --report`'s tables.

    PYLLAMA_DATA_DIR=../shared/data python experiments/gptq_spread.py --rows 7 8
    python experiments/gptq_spread.py --grid=beyond --rows 7 --variants order1 order2
"""
from __future__ import annotations

import argparse
import json
import os
import re

import numpy as np

from ablation import (CALIBRATION, REFERENCE, RESULTS, SPREAD, Cell, _write, cell_calibration, cells_for,
                      reruns, run_cell)
from ablation import report as ablation_report

from pyllama_jax.data.text import calibration_windows, data_dir, load_text

VARIANTS = ("order1", "order2", "batch4", "hf-ids")  # the default set; any order<seed> or batch<n> works


def hf_calibration(cell: Cell) -> np.ndarray:
    """The cell's windows drawn from transformers' GGUF tokenizer's ids of the calibration text."""
    from transformers import AutoTokenizer

    from pyllama_jax.convert.names import embedded_path

    folder, name = os.path.split(embedded_path("smollm2-135m"))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    ids = tokenizer(load_text(os.path.join(data_dir(), CALIBRATION[cell.calibration])),
                    add_special_tokens=False)["input_ids"]
    return calibration_windows(ids, cell.recipe.nsamples, cell.seqlen, cell.recipe.seed)


def run_variant(cell: Cell, variant: str) -> dict:
    import pyllama_jax as pj

    resume = f"{cell.key}-{variant}"
    if variant == "hf-ids":
        return run_cell(cell, calib=hf_calibration(cell), resume_name=resume)
    calib = cell_calibration(cell, pj.load("smollm2-135m").tokenizer)
    if variant.startswith("batch"):
        return run_cell(cell, calib=calib, batch_size=int(variant.removeprefix("batch")), resume_name=resume)
    order = np.random.default_rng(int(variant.removeprefix("order"))).permutation(len(calib))
    return run_cell(cell, calib=calib[order], resume_name=resume)


def variant_name(text: str) -> str:
    if text != "hf-ids" and not re.fullmatch(r"(order|batch)[1-9]\d*", text):
        raise argparse.ArgumentTypeError(f"{text!r}: expected hf-ids, order<seed> or batch<n>")
    return text


def report() -> None:
    """gptq_spread.md: every reference row that has reruns, its runs side by side."""
    cells = cells_for("reference", 128, 128)
    found = {i: reruns(c.key) for i, c in enumerate(cells) if c.calibration}
    found = {i: runs for i, runs in found.items() if runs}
    variants = sorted({v for runs in found.values() for v in runs}, key=lambda v: (v == "hf-ids", v))
    lines = ["# GPTQ run-to-run spread from floating-point rounding alone", "",
             "`experiments/gptq_spread.py`: each reference row rerun in variants that compute the same mathematics "
             "(`order<seed>`: calibration windows shuffled, so each Hessian sums the same terms in another order; "
             "`batch<n>`: activations computed n windows at a time; `hf-ids`: windows cut from transformers' "
             "tokenizer's ids, the reference's exact input). WikiText-2, first 128 windows of 512, 128 "
             "calibration windows, seed 0.", "",
             "| setting | calibration | reference | ours (ablation.py) | " + " | ".join(variants) +
             " | min - max | mean | mean against reference |", "|---|---|---|---|" + "---|" * len(variants) + "---|---|---|"]
    for i, runs in found.items():
        cell, (_, calib, ref) = cells[i], REFERENCE[i]
        ppl = [json.load(open(os.path.join(RESULTS, "cells", f"{cell.key}.json")))["perplexity"]] + \
            [runs.get(v) for v in variants]
        done = [p for p in ppl if p is not None]
        lo, hi, mean = min(done), max(done), float(np.mean(done))
        lines.append(f"| {cell.label()} | {calib} | {ref:.2f} | " +
                     " | ".join("-" if p is None else f"{p:.2f}" for p in ppl) +
                     f" | {lo:.2f} - {hi:.2f} ({100 * (hi / lo - 1):.1f}%) | {mean:.2f} | {100 * (mean / ref - 1):+.1f}% |")
    _write(os.path.join(RESULTS, "gptq_spread.md"), "\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--grid", choices=["reference", "beyond", "novel"], default="reference")
    p.add_argument("--rows", type=int, nargs="*", default=[], help="indices of the grid's calibrated rows")
    p.add_argument("--variants", nargs="+", type=variant_name, default=list(VARIANTS))
    p.add_argument("--report", action="store_true", help="only rebuild the table")
    args = p.parse_args()
    cells = cells_for(args.grid, 128, 128)
    bad = [i for i in args.rows if not 0 <= i < len(cells) or cells[i].calibration is None]
    if bad or not (args.rows or args.report):
        p.error(f"--rows {bad}: expected indices of calibrated rows of the {args.grid} grid "
                f"({[i for i, c in enumerate(cells) if c.calibration]})")
    os.makedirs(SPREAD, exist_ok=True)
    if not args.report:
        for variant in args.variants:
            for i in args.rows:
                path = os.path.join(SPREAD, f"{cells[i].key}-{variant}.json")
                if os.path.exists(path):
                    continue
                print(f"{cells[i].label()} {cells[i].calibration} {variant}", flush=True)
                result = run_variant(cells[i], variant)
                print(f"    perplexity {result['perplexity']:.3f} (quantize {result['quant_seconds']:.0f} s)", flush=True)
                _write(path, json.dumps(result, indent=1))
                report()
                ablation_report()
    report()


if __name__ == "__main__":
    main()
