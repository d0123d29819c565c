"""Our JAX GPTQ against a plain PyTorch GPTQ (the published algorithm) on real SmolLM2 layers.

Both quantize the same weight with the same Hessian (real calibration activations of block 0,
"wiki-tail" text), 4-bit, groupsize 128, blocksize 128, percdamp 0.01. Runs alternate in one
process; we report medians, their ratio, and the output error ||XW - XQ|| of each (they should
agree). The first JAX call (compilation) is timed separately.

    python benchmarks/gptq_speed.py --repeats=5 --samples=16
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

import jax
import jax.numpy as jnp
import torch

from pyllama_jax.data.text import calibration_windows, data_dir, load_text
from pyllama_jax.quant.calibrate import linear_inputs
from pyllama_jax.quant.gptq import GPTQConfig, HessianAccumulator, gptq_quantize
from pyllama_jax.model.packing import dequantize
from pyllama_jax.model.qlinear import get_module
from pyllama_jax.quant.rtn import QuantSpec


def torch_gptq(W: torch.Tensor, H: torch.Tensor, bits: int, groupsize: int, blocksize: int = 128,
               percdamp: float = 0.01) -> torch.Tensor:
    """GPTQ as published (Frantar et al., Algorithm 1 with lazy batch updates), W `[out, in]`."""
    W, H = W.clone().float(), H.clone()
    maxq = 2 ** bits - 1
    n = W.shape[1]

    def params(x):
        xmin = torch.clamp(x.min(1).values, max=0)
        xmax = torch.clamp(x.max(1).values, min=0)
        both0 = (xmin == 0) & (xmax == 0)
        xmin[both0], xmax[both0] = -1, 1
        scale = (xmax - xmin) / maxq
        return scale[:, None], torch.round(-xmin / scale)[:, None]

    scale, zero = params(W)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H[range(n), range(n)] += percdamp * torch.mean(torch.diag(H))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            if groupsize != -1 and (i1 + i) % groupsize == 0:
                scale, zero = params(W[:, i1 + i:i1 + i + groupsize])
            w, d = W1[:, i], Hinv1[i, i]
            q = (scale * (torch.clamp(torch.round(w[:, None] / scale) + zero, 0, maxq) - zero)).flatten()
            Q[:, i1 + i] = q
            err = (w - q) / d
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q


def real_problems(samples: int):
    """(name, W[in, out], X[tokens, in]) for block 0's q, up and down of SmolLM2 on wiki-tail text."""
    import pyllama_jax as pj

    model = pj.load("smollm2-135m")
    text = load_text(os.path.join(data_dir(), "wikitext-2-raw", "wiki.test.raw") + "@640000:")
    ids = calibration_windows(model.tokenizer.encode(text, bos=False), samples, 512, seed=0)
    x = jnp.take(model.module.embed[...], jnp.asarray(ids), axis=0)
    acts, _ = linear_inputs(model.module.layers[0], x)
    return [(f"layers.0.{p}", np.asarray(get_module(model.module.layers[0], p).kernel[...]),
             np.asarray(acts[p]).reshape(-1, acts[p].shape[-1])) for p in ("attn.q", "mlp.up", "mlp.down")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--samples", type=int, default=16, help="calibration windows of 512 tokens for the Hessian")
    args = p.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    spec, cfg = QuantSpec(bits=4, groupsize=128), GPTQConfig()
    print(f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, 4-bit g128, {args.samples}x512 calibration tokens")
    print("| layer | shape [in, out] | JAX first call (compile) | JAX median | PyTorch median | PyTorch / JAX | "
          "rel. output error JAX | PyTorch |")
    print("|---|---|---|---|---|---|---|---|")
    for name, w, x in real_problems(args.samples):
        acc = HessianAccumulator(w.shape[0])
        acc.add(jnp.asarray(x))
        h = acc.hessian()
        ht, wt = torch.from_numpy(np.array(h)), torch.from_numpy(w.T.copy())
        t0 = time.perf_counter()
        qw, _ = gptq_quantize(w, h, spec, cfg)
        first = time.perf_counter() - t0
        tj, tt = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            qw, _ = gptq_quantize(w, h, spec, cfg)
            jax.block_until_ready(qw.qweight)
            tj.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            qt = torch_gptq(wt, ht, 4, 128)
            tt.append(time.perf_counter() - t0)
        ref = x @ w
        err_j = np.linalg.norm(x @ np.asarray(dequantize(qw)) - ref) / np.linalg.norm(ref)
        err_t = np.linalg.norm(x @ qt.numpy().T - ref) / np.linalg.norm(ref)
        mj, mt = float(np.median(tj)), float(np.median(tt))
        print(f"| {name} | {list(w.shape)} | {first:.2f} s | {mj:.3f} s | {mt:.3f} s | {mt / mj:.1f}x | "
              f"{err_j:.5f} | {err_t:.5f} |", flush=True)


if __name__ == "__main__":
    main()
