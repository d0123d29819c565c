"""GPTQ/RTN/AWQ/SignRound on SmolLM2-135M: the reference table, the methods beyond it and the bits x
groupsize x method x act-order sweep.

Every cell (quantization recipe + calibration + evaluation) is saved to
`experiments/results/cells/<key>.json` when it finishes and skipped when rerun; calibrated runs
(GPTQ, AWQ, SignRound) keep per-block checkpoints under `artifacts/ablation/` so an interrupted
cell resumes. The Markdown table, CSV and plot are rebuilt from all finished cells. `--results`
puts cells and tables in another folder (a trial run that must not join the real table).

    PYLLAMA_DATA_DIR=../shared/data python experiments/ablation.py --grid=reference
    python experiments/ablation.py --grid=beyond   # act-order, MSE, more samples, AWQ, SignRound, AWQ+GPTQ
    python experiments/ablation.py --grid=novel    # calibrated on the novel's first 4/5, evaluated on its last 1/5
    python experiments/ablation.py --grid=sweep --windows=16 --nsamples=32
    python experiments/ablation.py --report   # tables and plot only
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Sequence

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from pyllama_jax.data.text import calibration_windows, data_dir, eval_windows
from pyllama_jax.eval.perplexity import corpus_ids, window_nlls
from pyllama_jax.quant.driver import quantize
from pyllama_jax.quant.recipe import METHOD_DEFAULTS, QuantRecipe, recipe_fields, with_method_defaults

RESULTS = os.path.join(REPO, "experiments", "results")
SPREAD = os.path.join(RESULTS, "spread")  # gptq_spread.py's reruns: <cell key>-<variant>.json
WIKI = "wikitext-2-raw/wiki.test.raw"
NOVEL = "gutenberg/pride_and_prejudice.txt"
NOVEL_SPLIT = 563316  # 4/5 of the novel's 704,145 characters
CALIBRATION = {"gutenberg": NOVEL, "wiki-tail": WIKI + "@640000:", "gutenberg-head": f"{NOVEL}@0:{NOVEL_SPLIT}"}
EVALUATION = {"wiki": WIKI, "gutenberg-tail": f"{NOVEL}@{NOVEL_SPLIT}:"}  # evaluation text: its first windows
# ../shared/reference/gptq-smollm2.md: (recipe fields, calibration) -> reference perplexity
REFERENCE = [
    (None, None, 30.03),
    (dict(nearest=True, wbits=4, groupsize=128), None, 40.61),
    (dict(wbits=4, groupsize=128), "gutenberg", 43.68),
    (dict(nearest=True, wbits=3, groupsize=128), None, 151.16),
    (dict(wbits=3, groupsize=128), "gutenberg", 143.92),
    (dict(nearest=True, wbits=4, groupsize=-1), None, 53.78),
    (dict(wbits=4, groupsize=-1), "gutenberg", 58.45),
    (dict(wbits=4, groupsize=-1), "wiki-tail", 49.91),
    (dict(wbits=4, groupsize=128), "wiki-tail", 39.51),
    (dict(wbits=3, groupsize=128), "wiki-tail", 98.25),
    (dict(nearest=True, wbits=8, groupsize=-1), None, 30.03),
]
BEYOND = [  # improvements, each against its reference row
    (dict(wbits=4, groupsize=128, act_order=True), "wiki-tail"),
    (dict(wbits=3, groupsize=128, act_order=True), "wiki-tail"),
    (dict(wbits=4, groupsize=128, mse=True), "wiki-tail"),
    (dict(wbits=3, groupsize=128, mse=True), "wiki-tail"),
    (dict(nearest=True, wbits=3, groupsize=128, mse=True), None),
    (dict(wbits=4, groupsize=128, nsamples=256), "wiki-tail"),
    (dict(wbits=3, groupsize=128, nsamples=256), "wiki-tail"),
    (dict(nearest=True, wbits=4, groupsize=128, awq=True), "wiki-tail"),
    (dict(nearest=True, wbits=3, groupsize=128, awq=True), "wiki-tail"),
    (dict(nearest=True, wbits=4, groupsize=128, awq=True, awq_clip=True), "wiki-tail"),
    (dict(nearest=True, wbits=3, groupsize=128, awq=True, awq_clip=True), "wiki-tail"),
    (dict(nearest=True, wbits=4, groupsize=128, signround_steps=200), "wiki-tail"),
    (dict(nearest=True, wbits=3, groupsize=128, signround_steps=200), "wiki-tail"),
    (dict(wbits=4, groupsize=128, act_order=True, awq=True), "wiki-tail"),
    (dict(wbits=3, groupsize=128, act_order=True, awq=True), "wiki-tail"),
    (dict(wbits=4, groupsize=128, act_order=True, awq=True, awq_clip=True), "wiki-tail"),
]
# Generalisation: every method calibrated on the novel's first four fifths (or on wiki-tail, to see how far
# WikiText calibration carries) and evaluated on its last fifth, which no calibration window touches.
NOVEL_GRID = [
    (None, None),
    (dict(nearest=True, wbits=4, groupsize=128), None),
    (dict(wbits=4, groupsize=128, act_order=True), "gutenberg-head"),
    (dict(nearest=True, wbits=4, groupsize=128, awq=True), "gutenberg-head"),
    (dict(wbits=4, groupsize=128, act_order=True, awq=True), "gutenberg-head"),
    (dict(nearest=True, wbits=4, groupsize=128, signround_steps=200), "gutenberg-head"),
    (dict(wbits=4, groupsize=128, act_order=True), "wiki-tail"),
    (dict(nearest=True, wbits=3, groupsize=128), None),
    (dict(wbits=3, groupsize=128, act_order=True), "gutenberg-head"),
    (dict(wbits=3, groupsize=128, act_order=True, awq=True), "gutenberg-head"),
]
BEYOND_FIELDS = ("act_order", "mse", "nsamples")  # options: a BEYOND row without them (or its method) is its baseline


@dataclasses.dataclass(frozen=True)
class Cell:
    recipe: QuantRecipe | None  # None = FP32
    calibration: str | None  # key of CALIBRATION (calibrated recipes only)
    windows: int
    seqlen: int = 512
    evaluation: str = "wiki"  # key of EVALUATION

    @property
    def key(self) -> str:
        fields = [recipe_fields(self.recipe) if self.recipe else None, self.calibration, self.windows, self.seqlen]
        # cells evaluated on WikiText keep the keys they had before other evaluation texts existed
        blob = json.dumps(fields + ([self.evaluation] if self.evaluation != "wiki" else []), sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]

    def label(self) -> str:
        return "FP32" if self.recipe is None else self.recipe.describe()


def bits_per_weight(recipe: QuantRecipe | None, n_in: int, n_out: int) -> float:
    """Stored bits per weight of one linear in AutoGPTQ's format (float16 scales, packed zeros, g_idx)."""
    if recipe is None:
        return 32.0
    groups = 1 if recipe.groupsize == -1 else -(-n_in // recipe.groupsize)
    return recipe.wbits + groups * (16 + recipe.wbits) / n_in + 32 / n_out


def model_bpw(recipe: QuantRecipe | None, config) -> float:
    """Parameter-weighted bits per weight over the quantized linears of every block."""
    d, h, kv = config.dim, config.hidden_dim, config.kv_heads * config.head_dim
    shapes = [(d, d), (d, kv), (d, kv), (d, d), (d, h), (d, h), (h, d)]
    total = sum(i * o for i, o in shapes)
    return sum(bits_per_weight(recipe, i, o) * i * o for i, o in shapes) / total


def cell_calibration(cell: Cell, tokenizer) -> np.ndarray:
    """The cell's calibration windows `[nsamples, seqlen]`, drawn as GPTQ's loaders draw them."""
    ids = corpus_ids(tokenizer, os.path.join(data_dir(), CALIBRATION[cell.calibration]))
    return calibration_windows(ids, cell.recipe.nsamples, cell.seqlen, cell.recipe.seed)


def run_cell(cell: Cell, model_name: str = "smollm2-135m", calib: np.ndarray | None = None,
             batch_size: int = 8, resume_name: str | None = None) -> dict:
    """Quantize and evaluate one cell. `calib`, `batch_size` and `resume_name` (a folder under
    `artifacts/ablation/`, default the cell's key) let `gptq_spread.py` rerun a GPTQ cell."""
    import pyllama_jax as pj

    model = pj.load(model_name)
    ids = corpus_ids(model.tokenizer, os.path.join(data_dir(), EVALUATION[cell.evaluation]))
    windows = eval_windows(ids, cell.seqlen, cell.windows)
    start = time.perf_counter()
    if cell.recipe is not None and cell.recipe.calibrated:
        calib = cell_calibration(cell, model.tokenizer) if calib is None else calib
        resume = os.path.join(REPO, "artifacts", "ablation", resume_name or cell.key)
        quantize(model.module, cell.recipe, calibration=calib, resume_dir=resume, batch_size=batch_size)
    elif cell.recipe is not None:
        quantize(model.module, cell.recipe)
    quant_seconds = time.perf_counter() - start
    start = time.perf_counter()
    nlls = window_nlls(model.module, windows, batch_size=8)
    return {"label": cell.label(), "calibration": cell.calibration, "evaluation": cell.evaluation,
            "windows": int(len(nlls)),
            "seqlen": cell.seqlen, "recipe": recipe_fields(cell.recipe) if cell.recipe else None,
            "perplexity": float(np.exp(nlls.mean())), "window_nlls": nlls.tolist(),
            "bits_per_weight": model_bpw(cell.recipe, model.config),
            "quant_seconds": quant_seconds, "eval_seconds": time.perf_counter() - start}


def cells_for(grid: str, windows: int, nsamples: int) -> list[Cell]:
    evaluation = "gutenberg-tail" if grid == "novel" else "wiki"

    def cell(fields, calib):
        if fields is None:
            return Cell(None, None, windows, evaluation=evaluation)
        recipe = QuantRecipe(**{"nsamples": nsamples, "seqlen": 512, **fields})
        return Cell(recipe, calib if recipe.calibrated else None, windows, evaluation=evaluation)

    if grid == "reference":
        return [cell(f, c) for f, c, _ in REFERENCE]
    if grid == "beyond":
        return [cell(f, c) for f, c in BEYOND]
    if grid == "novel":
        return [cell(f, c) for f, c in NOVEL_GRID]
    sweep = [cell(None, None)]
    for bits in (2, 3, 4, 8):
        for gs in (32, 128, -1):
            sweep.append(cell(dict(nearest=True, wbits=bits, groupsize=gs), None))
            # 8-bit RTN already equals FP32 (reference table): one GPTQ cell shows it, the rest add nothing
            for act in (False, True) if bits < 8 else (False,) if gs == -1 else ():
                sweep.append(cell(dict(wbits=bits, groupsize=gs, act_order=act), "wiki-tail"))
    return sweep


def _write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _load_cell(path: str) -> dict:
    """A finished cell, its recipe with every field (cells made before a method or the evaluation field was
    added lack it)."""
    row = json.load(open(path))
    return dict(row, recipe=with_method_defaults(row["recipe"]) if row["recipe"] else None,
                evaluation=row.get("evaluation", "wiki"))


def report(results: str = RESULTS) -> None:
    """Rebuild reference.md, novel.md, sweep.md, ablation.csv and ablation.png in `results` from its finished cells."""
    folder = os.path.join(results, "cells")
    rows = [dict(_load_cell(os.path.join(folder, f)), key=f.removesuffix(".json"))
            for f in sorted(os.listdir(folder)) if f.endswith(".json")]
    wiki = [r for r in rows if r["evaluation"] == "wiki"]
    _write_reference(wiki, results)
    _write_novel([r for r in rows if r["evaluation"] == "gutenberg-tail"], results)
    _write_sweep(wiki, results)
    fields = ["label", "calibration", "nsamples", "evaluation", "windows", "perplexity", "runs", "mean", "min", "max",
              "bits_per_weight", "quant_seconds", "eval_seconds"]
    tmp = os.path.join(results, "ablation.csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(fields)
        for r in sorted(rows, key=lambda r: (r["evaluation"], r["windows"], r["bits_per_weight"], r["label"])):
            runs = all_runs(r)
            w.writerow([r["label"], r["calibration"] or "-", (r["recipe"] or {}).get("nsamples", "-") if r["calibration"] else "-",
                        r["evaluation"], r["windows"], f"{r['perplexity']:.4f}", len(runs),
                        f"{np.mean(runs):.4f}", f"{min(runs):.4f}", f"{max(runs):.4f}", f"{r['bits_per_weight']:.4f}",
                        f"{r['quant_seconds']:.1f}", f"{r['eval_seconds']:.1f}"])
    os.replace(tmp, os.path.join(results, "ablation.csv"))
    _plot(rows, results)


def reruns(key: str) -> dict[str, float]:
    """Perplexity of each `gptq_spread.py` rerun of cell `key` (same mathematics, other rounding), by variant."""
    names = sorted(os.listdir(SPREAD)) if os.path.isdir(SPREAD) else []
    found = [(f.removesuffix(".json").partition("-")[2], os.path.join(SPREAD, f)) for f in names
             if f.endswith(".json") and f.startswith(key + "-")]
    return {variant: json.load(open(path))["perplexity"] for variant, path in found}


def all_runs(row: dict) -> list[float]:
    """Perplexities of a finished cell and of its `gptq_spread.py` reruns."""
    return [row["perplexity"], *reruns(row["key"]).values()]


def mean_se(runs: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt(n); 0 for one run)."""
    return float(np.mean(runs)), float(np.std(runs, ddof=1) / np.sqrt(len(runs))) if len(runs) > 1 else 0.0


def runs_text(runs: Sequence[float]) -> str:
    """`mean +- SE (min - max, n runs)`, or the one figure."""
    if len(runs) == 1:
        return f"{runs[0]:.2f} (1 run)"
    mean, se = mean_se(runs)
    return f"{mean:.2f} +- {se:.2f} ({min(runs):.2f} - {max(runs):.2f}, {len(runs)} runs)"


def against(runs: Sequence[float], base: Sequence[float]) -> str:
    """The difference of two means in percent, and in standard errors of that difference where both have reruns."""
    (m, se), (mb, seb) = mean_se(runs), mean_se(base)
    text = f"{100 * (m / mb - 1):+.1f}%"
    if len(runs) > 1 and len(base) > 1:
        text += f", {(m - mb) / np.hypot(se, seb):+.1f} SE"
    return text


def _find(rows, fields, calib, windows):
    for r in rows:
        rec = r["recipe"]
        if r["windows"] != windows or r["calibration"] != calib or (rec is None) != (fields is None):
            continue
        if rec is None or all(rec.get(k) == v for k, v in {"nsamples": 128, "act_order": False, "mse": False,
                                                            "nearest": False, **METHOD_DEFAULTS, **fields}.items()):
            return r
    return None


def _write_reference(rows, results: str) -> None:
    lines = ["# SmolLM2-135M-Instruct on WikiText-2 (first 128 windows of 512): ours vs the reference", "",
             "Reference: `../shared/reference/gptq-smollm2.md` (IST-DASLab GPTQ in PyTorch). Ours: "
             "`experiments/ablation.py --grid=reference`, 128 calibration windows of 512, seed 0.", "",
             "Reruns: `gptq_spread.py` repeats a GPTQ cell in variants that compute the same mathematics "
             "(calibration order, batch size, transformers' tokenizer ids); the mean is over the run and its reruns.",
             "", "| setting | calibration | reference | ours | difference | ours, all runs: mean (min - max, runs) "
             "| mean against reference | our quantization time |", "|---|---|---|---|---|---|---|---|"]
    for fields, calib, ref in REFERENCE:
        r = _find(rows, fields, calib, 128)
        label = "FP32" if fields is None else QuantRecipe(**fields).describe()
        if r is None:
            lines.append(f"| {label} | {calib or '-'} | {ref:.2f} | not run | | | | |")
            continue
        qt = f"{r['quant_seconds']:.0f} s" if fields else "-"
        runs = [r["perplexity"], *reruns(r["key"]).values()]
        mean = float(np.mean(runs))
        spread = (f"{mean:.2f} ({min(runs):.2f} - {max(runs):.2f}, {len(runs)}) | {100 * (mean / ref - 1):+.2f}%"
                  if len(runs) > 1 else "- | -")
        lines.append(f"| {label} | {calib or '-'} | {ref:.2f} | {r['perplexity']:.2f} | "
                     f"{100 * (r['perplexity'] / ref - 1):+.2f}% | {spread} | {qt} |")
    lines += ["", "## Beyond the reference (same protocol)", "",
              "Each setting against its baseline: the same recipe without its method (AWQ, SignRound), or plain GPTQ "
              "for an option (act-order, MSE, calibration size); both as means of the cell and its reruns "
              "(`gptq_spread.py --grid=beyond`); SE = standard error of the difference of the means.", "",
              "| setting | calibration | calibration samples | bits per weight | perplexity: mean +- SE (range, runs) "
              "| baseline | difference | against FP32 |", "|---|---|---|---|---|---|---|---|"]
    fp32 = _find(rows, None, None, 128)
    for fields, calib in BEYOND:
        r = _find(rows, fields, calib, 128)
        if r is None:
            continue
        # a method's row against the same recipe without it; an option's row against plain GPTQ
        drop = METHOD_DEFAULTS if any(k in METHOD_DEFAULTS for k in fields) else BEYOND_FIELDS
        base_fields = {k: v for k, v in fields.items() if k not in drop}
        base = _find(rows, base_fields, calib if QuantRecipe(**base_fields).calibrated else None, 128)
        runs, base_runs = all_runs(r), all_runs(base) if base else []
        lines.append(f"| {QuantRecipe(**fields).describe()} | {calib or '-'} | {fields.get('nsamples', 128)} | "
                     f"{r['bits_per_weight']:.2f} | {runs_text(runs)} | "
                     f"{runs_text(base_runs) + ' ' + base['label'] if base else '-'} | "
                     f"{against(runs, base_runs) if base else '-'} | "
                     f"{against(runs, [fp32['perplexity']]) if fp32 else '-'} |")
    _write(os.path.join(results, "reference.md"), "\n".join(lines) + "\n")


def _write_novel(rows, results: str) -> None:
    """novel.md: every cell evaluated on the last fifth of the novel, against RTN and FP32 on the same windows."""
    if not rows:
        return
    fp32 = next((r for r in rows if r["recipe"] is None), None)
    lines = ["# Generalisation: SmolLM2-135M-Instruct on the last fifth of the Gutenberg novel", "",
             f"`experiments/ablation.py --grid=novel`: perplexity on `{EVALUATION['gutenberg-tail']}` "
             f"(its first {rows[0]['windows']} windows of 512). `gutenberg-head` calibration draws its 128 windows "
             f"from the first four fifths (`{CALIBRATION['gutenberg-head']}`), so no evaluation token was seen; "
             "`wiki-tail` is the WikiText calibration of the reference table.", "",
             "| setting | calibration | bits per weight | perplexity: mean +- SE (range, runs) | against RTN, same bits "
             "| against FP32 |", "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["recipe"] is not None, -(r["recipe"] or {}).get("wbits", 32), r["label"])):
        rtn = next((q for q in rows if q["recipe"] and q["recipe"]["nearest"] and not q["recipe"]["awq"]
                    and not q["recipe"]["signround_steps"] and r["recipe"]
                    and (q["recipe"]["wbits"], q["recipe"]["groupsize"]) == (r["recipe"]["wbits"], r["recipe"]["groupsize"])), None)
        runs = all_runs(r)
        lines.append(f"| {r['label']} | {r['calibration'] or '-'} | {r['bits_per_weight']:.2f} | {runs_text(runs)} | "
                     f"{against(runs, all_runs(rtn)) if rtn and rtn is not r else '-'} | "
                     f"{against(runs, [fp32['perplexity']]) if fp32 and r is not fp32 else '-'} |")
    _write(os.path.join(results, "novel.md"), "\n".join(lines) + "\n")


def _write_sweep(rows, results: str) -> None:
    """sweep.md: perplexity per bits x groupsize, RTN against GPTQ with and without act-order, for every
    evaluation size that has sweep cells (cells with default mse/sym)."""
    lines = ["# SmolLM2-135M-Instruct: bits x groupsize x method x act-order", "",
             "`experiments/ablation.py --grid=sweep`: WikiText-2 perplexity (first windows of 512 tokens), GPTQ "
             "calibrated on wiki-tail. Bits per weight count AutoGPTQ's storage: float16 scales, packed zeros, g_idx.", ""]
    plain = [r for r in rows if r["calibration"] in (None, "wiki-tail")
             and (r["recipe"] is None or not any(r["recipe"][k] != v for k, v in
                                                  {"mse": False, "sym": False, **METHOD_DEFAULTS}.items()))]
    for windows in sorted({r["windows"] for r in plain}, reverse=True):
        sel = [r for r in plain if r["windows"] == windows]
        samples = sorted({r["recipe"]["nsamples"] for r in sel if r["recipe"] and not r["recipe"]["nearest"]})
        fp32 = next((r["perplexity"] for r in sel if r["recipe"] is None), None)
        lines += [f"## {windows} evaluation windows, GPTQ on {samples[0] if samples else '-'} calibration windows"
                  + (f" (FP32: {fp32:.2f})" if fp32 else ""), "",
                  "| bits | groupsize | bits per weight | RTN | GPTQ | GPTQ act-order |", "|---|---|---|---|---|---|"]
        found = {(q["wbits"], q["groupsize"], q["nearest"], q["act_order"]): r for r in sel if (q := r["recipe"])
                 and (q["nearest"] or q["nsamples"] == samples[0])}
        for bits, gs in sorted({key[:2] for key in found}, key=lambda k: (k[0], k[1] == -1, k[1])):
            ppl = [f"{found[bits, gs, *m]['perplexity']:.2f}" if (bits, gs, *m) in found else "-"
                   for m in ((True, False), (False, False), (False, True))]
            bpw = next(r["bits_per_weight"] for key, r in found.items() if key[:2] == (bits, gs))
            lines.append(f"| {bits} | {'per-row' if gs == -1 else gs} | {bpw:.2f} | {' | '.join(ppl)} |")
        lines.append("")
    _write(os.path.join(results, "sweep.md"), "\n".join(lines))


def _plot(rows, results: str) -> None:
    """ablation.png: perplexity against stored bits per weight, one panel per evaluation set (all its cells on the
    same windows), FP32 as a line, every point labelled with its groupsize and method; reruns as mean and range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["evaluation"], r["windows"]) for r in rows}, key=lambda p: (p[0] != "wiki", -p[1]))
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5.5), squeeze=False)
    names = {"wiki": "WikiText-2 test", "gutenberg-tail": "Gutenberg novel, last fifth"}
    for ax, (evaluation, windows) in zip(axes[0], panels):
        sel = [r for r in rows if r["evaluation"] == evaluation and r["windows"] == windows]
        for r in sel:
            if r["recipe"] is None:
                ax.axhline(r["perplexity"], color="k", ls="--", lw=1, label=f"FP32 {r['perplexity']:.2f}")
        quantized = [r for r in sel if r["recipe"] is not None]
        methods = sorted({_method(r) for r in quantized})
        for i, (method, marker) in enumerate(zip(methods, "os^DP*vXh<>pd12348")):
            for r in (r for r in quantized if _method(r) == method):
                runs = all_runs(r)
                mean = float(np.mean(runs))
                x = r["bits_per_weight"] + 0.05 * (i - (len(methods) - 1) / 2)  # methods side by side at one width
                ax.errorbar(x, mean, yerr=[[mean - min(runs)], [max(runs) - mean]], fmt=marker, capsize=3,
                            color=f"C{i % 10}", label=method)
                group = "per-row" if r["recipe"]["groupsize"] == -1 else f"g{r['recipe']['groupsize']}"
                ax.annotate(f"{r['recipe']['wbits']}b {group}" + (f" x{len(runs)}" if len(runs) > 1 else ""),
                            (x, mean), fontsize=6, xytext=(4, 2), textcoords="offset points", color=f"C{i % 10}")
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=7)
        ax.set_title(f"{names.get(evaluation, evaluation)}: first {windows} windows of 512" if evaluation == "wiki"
                     else f"{names.get(evaluation, evaluation)}: {windows} windows of 512", fontsize=9)
        ax.set_xlabel("bits per weight (incl. fp16 scales, packed zeros, g_idx)")
        ax.set_ylabel("perplexity (mean of runs; bars: range)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(results, "ablation.png.tmp.png"), dpi=120)
    os.replace(os.path.join(results, "ablation.png.tmp.png"), os.path.join(results, "ablation.png"))


def _method(row: dict) -> str:
    """A plotted cell's method in words, with its calibration text and size: `GPTQ act-order (wiki-tail, 128)`."""
    q = QuantRecipe(**row["recipe"])
    name = q.method + (" mse" if q.mse else "") + (" sym" if q.sym else "")
    return name + (f" ({row['calibration']}, {q.nsamples})" if row["calibration"] else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--grid", choices=["reference", "beyond", "novel", "sweep"], default="reference")
    p.add_argument("--windows", type=int, default=128, help="evaluation windows of 512 tokens")
    p.add_argument("--nsamples", type=int, default=128, help="GPTQ calibration windows of 512 tokens")
    p.add_argument("--only", type=int, nargs="*", help="indices of the grid's cells to run, in this order")
    p.add_argument("--report", action="store_true", help="only rebuild the tables and plot")
    p.add_argument("--results", default=RESULTS, help="folder of the cells and tables (another one for a trial run)")
    args = p.parse_args()
    os.makedirs(os.path.join(args.results, "cells"), exist_ok=True)
    if not args.report:
        cells = cells_for(args.grid, args.windows, args.nsamples)
        for i in args.only if args.only is not None else range(len(cells)):
            cell = cells[i]
            path = os.path.join(args.results, "cells", f"{cell.key}.json")
            if os.path.exists(path):
                continue
            print(f"[{i + 1}/{len(cells)}] {cell.label()} {cell.calibration or ''}", flush=True)
            result = run_cell(cell)
            print(f"    perplexity {result['perplexity']:.3f} (quantize {result['quant_seconds']:.0f} s, "
                  f"eval {result['eval_seconds']:.0f} s)", flush=True)
            _write(path, json.dumps(result, indent=1))
            report(args.results)
    report(args.results)


if __name__ == "__main__":
    main()
