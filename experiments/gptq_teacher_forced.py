"""GPTQ parity without the cascade: both implementations fed the PyTorch pipeline's inputs at every block.

The PyTorch driver of `gptq_parity.py` quantizes SmolLM2 block by block as published (IST-DASLab's
driver logic on transformers' model); its block inputs come from its own quantized earlier blocks.
At every block, each of the 7 linears is compared two ways, so a difference cannot carry over from
one block to the next:
- **same Hessian**: our `gptq_quantize` on the PyTorch driver's Hessian of that linear (equal inputs):
  the share of codes that differ, and the relative output error of each,
  `||X(W - Q)||^2 / ||XW||^2 = tr(dW H dW^T) / tr(W H W^T)`;
- **same block inputs**: our own driver step (`quant.calibrate`) on the same block input: our JAX
  block, partly quantized by our own codes, gives its own Hessians within the block (equal up to
  float rounding for k, v, q; from o on they follow the codes each side chose). Compared: the
  share of codes that differ from the PyTorch driver's, and our relative error on our Hessian
  against theirs on theirs.

    PYLLAMA_DATA_DIR=../shared/data python experiments/gptq_teacher_forced.py --bits=3 --groupsize=128
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax.numpy as jnp
import numpy as np
import torch

from gptq_parity import OURS, SEQUENTIAL, codes_differing, first_block_inputs, hessians, hf_model, run_layer, torch_gptq

from pyllama_jax.data.text import calibration_windows, data_dir
from pyllama_jax.eval.perplexity import corpus_ids
from pyllama_jax.model.packing import dequantize
from pyllama_jax.model.qlinear import get_module, replace_linear
from pyllama_jax.quant.calibrate import inputs_hessian, run_batched
from pyllama_jax.quant.gptq import GPTQConfig, gptq_quantize
from pyllama_jax.quant.rtn import QuantSpec
from pyllama_jax.quant.taps import group_inputs

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def relative_error(w: np.ndarray, q: np.ndarray, h: np.ndarray) -> float:
    """`||X(W - Q)||^2 / ||XW||^2` from the Hessian `h` (proportional to `X^T X`), `w`, `q` `[out, in]`."""
    w, q, h = (np.asarray(a, np.float64) for a in (w, q, h))
    d = w - q
    return float(np.sum((d @ h) * d) / np.sum((w @ h) * w))


def compare(bits: int, groupsize: int, blocks: int, calibration: str) -> list[dict]:
    import pyllama_jax as pj

    spec, gptq = QuantSpec(bits=bits, groupsize=groupsize), GPTQConfig()
    loaded = pj.load("smollm2-135m")
    ours = loaded.module
    calib = calibration_windows(corpus_ids(loaded.tokenizer, os.path.join(data_dir(), calibration)), 128, 512, 0)
    hf = hf_model()
    rows = []
    with torch.no_grad():
        x, extra = first_block_inputs(hf, calib)
        for i in range(blocks):
            start = time.perf_counter()
            layer, mine, x_np = hf.model.layers[i], ours.layers[i], x.numpy()
            for names, group_input in zip(SEQUENTIAL, group_inputs):
                theirs_h = hessians(layer, x, extra, names)
                own_h = inputs_hessian(run_batched(group_input, mine, x_np, 8), 8)
                for n in names:
                    lin, path = layer.get_submodule(n), OURS[n]
                    w, h = lin.weight.data.clone(), theirs_h[n]
                    q_torch = torch_gptq(w, h, bits, groupsize).numpy()
                    same, _ = gptq_quantize(jnp.asarray(w.numpy().T), jnp.asarray(h.numpy()), spec, gptq, path)
                    q_same = np.asarray(dequantize(same)).T
                    own, _ = gptq_quantize(get_module(mine, path).kernel[...], own_h, spec, gptq, path)
                    replace_linear(mine, path, own)
                    q_own = np.asarray(dequantize(own)).T
                    lin.weight.data = torch.from_numpy(q_torch)
                    w, h_t, h_o = w.numpy(), h.numpy(), np.asarray(own_h)
                    err_torch = relative_error(w, q_torch, h_t)
                    rows.append({"block": i, "linear": path,
                                 "same_h_differing": codes_differing(q_same, q_torch, bits),
                                 "err_torch": err_torch, "err_same_h": relative_error(w, q_same, h_t),
                                 "own_differing": codes_differing(q_own, q_torch, bits),
                                 "err_own": relative_error(w, q_own, h_o)})
            x = run_layer(layer, x, extra)
            print(f"block {i}: {time.perf_counter() - start:.0f} s", flush=True)
    return rows


def report(rows: list[dict], bits: int, groupsize: int, calibration: str) -> str:
    same_ratio = np.array([r["err_same_h"] / r["err_torch"] for r in rows])
    own_ratio = np.array([r["err_own"] / r["err_torch"] for r in rows])
    same_diff = np.array([r["same_h_differing"] for r in rows])
    kvq0 = [r for r in rows if r["block"] == 0 and r["linear"] in ("attn.k", "attn.v", "attn.q")]
    g = "per-row" if groupsize == -1 else f"g{groupsize}"
    lines = [
        f"# GPTQ {bits}-bit {g}, teacher-forced: ours against the PyTorch driver at every layer", "",
        f"`python experiments/gptq_teacher_forced.py --bits={bits} --groupsize={groupsize}` "
        f"(calibration `{calibration}`, 128 windows of 512, seed 0; {len(rows)} linears). Every block's input "
        "is the PyTorch driver's own (its earlier blocks quantized by its own codes), so nothing carries over "
        "from block to block. Error: `||X(W - Q)||^2 / ||XW||^2`, each on the Hessian its codes were solved from.",
        "",
        "## Same Hessian (the PyTorch driver's), both solvers",
        f"- Linears with identical codes: {int(np.sum(same_diff == 0))} of {len(rows)}; "
        f"codes differing: mean {same_diff.mean():.4%}, max {same_diff.max():.4%}.",
        f"- Our error / theirs: median {np.median(same_ratio):.6f}, range {same_ratio.min():.6f}-{same_ratio.max():.6f}; "
        f"within 1%: {int(np.sum(np.abs(same_ratio - 1) <= 0.01))} of {len(rows)}.", "",
        "## Same block inputs, each side's own Hessians within the block",
        f"- Block 0's k, v, q (inputs equal up to float rounding): codes differing "
        + ", ".join(f"{r['linear']} {r['own_differing']:.4%}" for r in kvq0) + ".",
        f"- Our error / theirs: median {np.median(own_ratio):.4f}, range {own_ratio.min():.4f}-{own_ratio.max():.4f}, "
        f"mean {own_ratio.mean():.4f}; within 1%: {int(np.sum(np.abs(own_ratio - 1) <= 0.01))} of {len(rows)}, "
        f"within 2%: {int(np.sum(np.abs(own_ratio - 1) <= 0.02))}.", "",
        "| block | linear | same H: codes differing | their error | ours / theirs | own block: codes differing | ours / theirs |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['block']} | {r['linear']} | {r['same_h_differing']:.4%} | {r['err_torch']:.5f} | "
              f"{r['err_same_h'] / r['err_torch']:.6f} | {r['own_differing']:.2%} | {r['err_own'] / r['err_torch']:.4f} |"
              for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--groupsize", type=int, default=128)
    p.add_argument("--blocks", type=int, default=30)
    p.add_argument("--calibration", default="wikitext-2-raw/wiki.test.raw@640000:")
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    rows = compare(args.bits, args.groupsize, args.blocks, args.calibration)
    name = f"teacher_forced_{args.bits}bit_{'row' if args.groupsize == -1 else f'g{args.groupsize}'}"
    os.makedirs(os.path.join(RESULTS, "teacher_forced"), exist_ok=True)
    with open(os.path.join(RESULTS, "teacher_forced", f"{name}.json"), "w") as f:
        json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    text = report(rows, args.bits, args.groupsize, args.calibration)
    with open(os.path.join(RESULTS, f"{name}.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
