"""Our GPTQ run against a PyTorch driver of the published algorithm on transformers' SmolLM2, block by block.

The PyTorch side follows IST-DASLab's `llama.py` driver: block 0's inputs captured for every
calibration window, groups `[k, v, q] -> [o] -> [up, gate] -> [down]` each quantized from
Hessians accumulated (per sample, as `H *= n/(n+1); H += 2/(n+1) x x^T`) by forward hooks on
the already partly quantized block, then the quantized block re-run to feed the next. It
quantizes with `benchmarks/gptq_speed.torch_gptq`. Our side is a finished
`experiments/ablation.py` GPTQ cell (its per-block checkpoints under `artifacts/ablation/`).
For each block and linear we print the share of weights that differ and their relative
difference; with `--eval` the PyTorch-quantized model's perplexity is measured as well and saved,
with its per-window NLLs, to `experiments/results/parity/`. Without `--cell` only the PyTorch side
runs (`--bits`, `--groupsize`): a rerun for `gptq_equivalence.py`.

    PYLLAMA_DATA_DIR=../shared/data python experiments/gptq_parity.py --cell=37d1b6dd5cc7 --blocks=3
    python experiments/gptq_parity.py --bits=3 --groupsize=128 --eval --order-seed=2  # a PyTorch rerun
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import time

import numpy as np
import torch

from pyllama_jax.data.text import calibration_windows, data_dir, eval_windows
from pyllama_jax.eval.perplexity import corpus_ids

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _benchmark(name: str):
    """benchmarks/<name>.py as a module (a sibling folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hf_model = _benchmark("decode").hf_model
torch_gptq = _benchmark("gptq_speed").torch_gptq

SEQUENTIAL = [("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"), ("self_attn.o_proj",),
              ("mlp.up_proj", "mlp.gate_proj"), ("mlp.down_proj",)]
OURS = {"self_attn.k_proj": "attn.k", "self_attn.v_proj": "attn.v", "self_attn.q_proj": "attn.q",
        "self_attn.o_proj": "attn.o", "mlp.up_proj": "mlp.up", "mlp.gate_proj": "mlp.gate",
        "mlp.down_proj": "mlp.down"}


def run_layer(layer, x: torch.Tensor, extra: dict) -> torch.Tensor:
    outs = []
    for j in range(len(x)):
        out = layer(x[j:j + 1], **extra)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return torch.cat(outs)


def first_block_inputs(hf, calib: np.ndarray) -> tuple[torch.Tensor, dict]:
    """Block 0's inputs for calibration ids `calib[n, t]` and the keyword arguments every block takes."""
    pos = torch.arange(calib.shape[1])[None]
    x = hf.model.embed_tokens(torch.from_numpy(calib.astype(np.int64)))
    return x, {"attention_mask": None, "position_ids": pos, "position_embeddings": hf.model.rotary_emb(x[:1], pos)}


def codes_differing(a: np.ndarray, b: np.ndarray, bits: int) -> float:
    """Share of weights `[out, in]` more than a tenth of a quantization step apart (one code apart is a
    whole step; float16 scales move the same code by ~1e-3 of a step)."""
    step = np.abs(b).max(axis=1, keepdims=True) / 2 ** bits
    return float(np.mean(np.abs(a - b) > 0.1 * step))


def hessians(layer, x: torch.Tensor, extra: dict, names) -> dict[str, torch.Tensor]:
    """GPTQ's `add_batch`: per-sample running average of `2 x x^T` over each linear's inputs."""
    hs = {n: [None, 0] for n in names}

    def hook(name):
        def add(_, inputs, __):
            inp = inputs[0].reshape(-1, inputs[0].shape[-1]).float().t()
            h, n = hs[name]
            h = torch.zeros(inp.shape[0], inp.shape[0]) if h is None else h * (n / (n + 1))
            inp = math.sqrt(2 / (n + 1)) * inp
            hs[name] = [h + inp @ inp.t(), n + 1]
        return add

    handles = [layer.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    run_layer(layer, x, extra)
    for h in handles:
        h.remove()
    return {n: h for n, (h, _) in hs.items()}


def save_run(bits: int, groupsize: int, args: argparse.Namespace, ppl: float, nlls: list[float],
             quant_seconds: float, hf) -> None:
    """The PyTorch run's perplexity and per-window NLLs, as `results/parity/torch-<bits>bit-<g>-<calib>-<order>.json`,
    and its quantized linears (float32 `[in, out]`, our names) under `artifacts/parity/` for `cross_eval.py`."""
    from safetensors.numpy import save_file

    g = "row" if groupsize == -1 else f"g{groupsize}"
    calib = {"wikitext-2-raw/wiki.test.raw@640000:": "wiki-tail"}.get(args.calibration, "custom")
    order = "first" if args.order_seed is None else f"order{args.order_seed}"
    folder = os.path.join(REPO, "experiments", "results", "parity")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"torch-{bits}bit-{g}-{calib}-{order}.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"driver": "PyTorch (gptq_parity.py)", "bits": bits, "groupsize": groupsize,
                   "calibration": args.calibration, "order_seed": args.order_seed, "blocks": args.blocks,
                   "perplexity": ppl, "window_nlls": nlls, "quant_seconds": quant_seconds,
                   "torch": torch.__version__}, f, indent=1)
    os.replace(path + ".tmp", path)
    weights = {f"layers.{i}.{OURS[n]}": hf.model.layers[i].get_submodule(n).weight.data.numpy().T.copy()
               for i in range(args.blocks) for names in SEQUENTIAL for n in names}
    artifacts = os.path.join(REPO, "artifacts", "parity")
    os.makedirs(artifacts, exist_ok=True)
    name = os.path.join(artifacts, os.path.basename(path).removesuffix(".json"))
    save_file(weights, name + ".tmp")
    os.replace(name + ".tmp", name + ".safetensors")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cell", help="key of a finished GPTQ cell under artifacts/ablation/ to compare with")
    p.add_argument("--bits", type=int, help="without --cell: the PyTorch run's bits")
    p.add_argument("--groupsize", type=int, default=128, help="without --cell: its groupsize (-1 per row)")
    p.add_argument("--blocks", type=int, default=30, help="blocks to quantize (and compare)")
    p.add_argument("--calibration", default="wikitext-2-raw/wiki.test.raw@640000:")
    p.add_argument("--eval", action="store_true", help="also measure the PyTorch-quantized model's perplexity")
    p.add_argument("--order-seed", type=int, help="shuffle the calibration windows (a rerun that differs only in "
                   "float rounding, as gptq_spread.py's order<seed>)")
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    import pyllama_jax as pj
    from pyllama_jax.convert.save import load_quant_weights
    from pyllama_jax.model.packing import dequantize

    if args.cell is None and args.bits is None:
        p.error("give --cell (compare with our run) or --bits (a PyTorch run only)")
    tok = pj.load("smollm2-135m").tokenizer
    calib = calibration_windows(corpus_ids(tok, os.path.join(data_dir(), args.calibration)), 128, 512, 0)
    if args.cell is not None:
        folder = os.path.join(REPO, "artifacts", "ablation", args.cell)
        settings = json.load(open(os.path.join(folder, "settings.json")))
        bits, gs = settings["spec"]["bits"], settings["spec"]["groupsize"]
        assert int(calib.astype(np.int64).sum()) == settings["calibration_checksum"], "other calibration windows"
    else:
        bits, gs = args.bits, args.groupsize
    if args.order_seed is not None:
        calib = calib[np.random.default_rng(args.order_seed).permutation(len(calib))]
    hf = hf_model()
    with torch.no_grad():
        x, extra = first_block_inputs(hf, calib)
        start = time.perf_counter()
        if args.cell is not None:
            print("| block | linear | weights differing | rel. diff |")
            print("|---|---|---|---|")
        for i in range(args.blocks):
            layer = hf.model.layers[i]
            ours = load_quant_weights(os.path.join(folder, f"block{i:03d}.safetensors")) if args.cell else None
            for names in SEQUENTIAL:
                hs = hessians(layer, x, extra, names)
                for n in names:
                    lin = layer.get_submodule(n)
                    q = torch_gptq(lin.weight.data, hs[n], bits, gs)
                    lin.weight.data = q
                    if ours is None:
                        continue
                    mine = np.asarray(dequantize(ours[OURS[n]])).T
                    print(f"| {i} | {n} | {codes_differing(mine, q.numpy(), bits):.4%} | "
                          f"{np.linalg.norm(mine - q.numpy()) / np.linalg.norm(q.numpy()):.2e} |", flush=True)
            x = run_layer(layer, x, extra)
        quant_seconds = time.perf_counter() - start
        print(f"PyTorch driver: {args.blocks} blocks quantized in {quant_seconds:.0f} s")
        if args.eval:
            ids = corpus_ids(tok, os.path.join(data_dir(), "wikitext-2-raw/wiki.test.raw"))
            windows = torch.from_numpy(eval_windows(ids, 512, 128).astype(np.int64))
            nlls = []
            for w in windows:
                logits = hf(w[None]).logits[0, :-1]
                nlls.append(torch.nn.functional.cross_entropy(logits, w[1:]).item())
            ppl = math.exp(np.mean(nlls))
            print(f"perplexity of the PyTorch-quantized model ({args.blocks} blocks, {len(nlls)} windows): {ppl:.3f}")
            save_run(bits, gs, args, ppl, nlls, quant_seconds, hf)


if __name__ == "__main__":
    main()
