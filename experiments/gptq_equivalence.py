"""Our GPTQ against the PyTorch driver, statistically: means of reruns that differ only in float rounding.

Our runs: an `ablation.py` cell (`results/cells/<key>.json`) and its `gptq_spread.py` reruns
(`results/spread/<key>-<variant>.json`). The PyTorch driver's runs: `gptq_parity.py --eval`
(`results/parity/torch-<bits>bit-<g>-<calibration>-<order>.json`). For each setting: the mean and
standard error of each side, the difference of the means and its standard error
(`sqrt(se_ours^2 + se_torch^2)`). Criterion (issue 18): the difference within 2 standard errors.
Writes `results/gptq_equivalence.md`.

    python experiments/gptq_equivalence.py
"""
from __future__ import annotations

import glob
import json
import os

import numpy as np

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# (label, our cell key, PyTorch file prefix): the two reference rows that stayed off on the mean
SETTINGS = [("GPTQ 3-bit g128, wiki-tail", "37d1b6dd5cc7", "torch-3bit-g128-wiki-tail"),
            ("GPTQ 4-bit per-row, wiki-tail", "1d6879ab88cb", "torch-4bit-row-wiki-tail")]


def _runs(paths: list[str]) -> dict[str, float]:
    return {os.path.basename(p).removesuffix(".json"): json.load(open(p))["perplexity"] for p in sorted(paths)}


def ours(key: str) -> dict[str, float]:
    return _runs([os.path.join(RESULTS, "cells", f"{key}.json")] + glob.glob(os.path.join(RESULTS, "spread", f"{key}-*.json")))


def theirs(prefix: str) -> dict[str, float]:
    return _runs(glob.glob(os.path.join(RESULTS, "parity", f"{prefix}-*.json")))


def summary(values: list[float]) -> tuple[float, float]:
    """Mean and standard error (sample standard deviation / sqrt(n))."""
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")


def report() -> str:
    lines = ["# GPTQ equivalence: our runs against the PyTorch driver's, as means of reruns", "",
             "`python experiments/gptq_equivalence.py`. Each run quantizes SmolLM2-135M-Instruct with the same "
             "algorithm and data (128 calibration windows of 512, seed 0; WikiText-2 test, first 128 windows of 512) "
             "and differs from the others only in float rounding: the calibration windows' order, or transformers' "
             "tokenizer ids (`hf-ids`, 4 of 65,536 ids differ). Ours: `ablation.py` and `gptq_spread.py`; "
             "theirs: `gptq_parity.py --eval` (IST-DASLab's driver logic on transformers' model). "
             "SE: standard error of a mean. Criterion: |difference| <= 2 SE of the difference.", "",
             "| setting | ours: runs, mean +- SE (min - max) | PyTorch: runs, mean +- SE (min - max) | "
             "difference +- SE | within 2 SE? |", "|---|---|---|---|---|"]
    details = []
    for label, key, prefix in SETTINGS:
        a, b = ours(key), theirs(prefix)
        if len(a) < 2 or len(b) < 2:
            lines.append(f"| {label} | {len(a)} run(s) | {len(b)} run(s) | - | too few runs |")
            continue
        (ma, sa), (mb, sb) = summary(list(a.values())), summary(list(b.values()))
        diff, se = ma - mb, float(np.hypot(sa, sb))
        verdict = "yes" if abs(diff) <= 2 * se else f"no ({abs(diff) / se:.1f} SE)"
        lines.append(f"| {label} | {len(a)}, {ma:.2f} +- {sa:.2f} ({min(a.values()):.2f} - {max(a.values()):.2f}) | "
                     f"{len(b)}, {mb:.2f} +- {sb:.2f} ({min(b.values()):.2f} - {max(b.values()):.2f}) | "
                     f"{diff:+.2f} +- {se:.2f} ({diff / mb:+.1%}) | {verdict} |")
        details.append(f"- {label}: ours " + ", ".join(f"{k} {v:.2f}" for k, v in a.items())
                       + "; PyTorch " + ", ".join(f"{k} {v:.2f}" for k, v in b.items()) + ".")
    return "\n".join(lines + ["", "Every run:"] + details) + "\n"


def main() -> None:
    text = report()
    path = os.path.join(RESULTS, "gptq_equivalence.md")
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    print(text)


if __name__ == "__main__":
    main()
