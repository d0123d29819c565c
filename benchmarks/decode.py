"""SmolLM2-135M decode and prefill speed on a CPU: pyllama-jax (float32, bfloat16, bfloat16 weights
with float32 compute, 8-bit and 4-bit round-to-nearest g128) against HF transformers float32, and
llama.cpp (`llama-cpp-python`) where it is installed: F32 (a GGUF file our writer makes from the
same weights) and Q4_1 (the embedded file itself).
llama.cpp decodes one sequence at a time here, so it has no batch-8 figure.

Protocol: every (tool, setting) runs in its own fresh process (JAX's and PyTorch's thread pools never
share one); rounds alternate the tools; each process warms up (compiles) first, then times greedy
decoding of --new_tokens tokens after a --prompt_tokens-token prompt (prefill excluded) and a
--prefill_tokens-token forward. Medians and ranges over rounds are printed, with the ratio to
transformers and the tokens/s that the weights' bytes allow at --bandwidth GB/s. Run it under
`chrt -f 10` on a shared machine.

    chrt -f 10 python benchmarks/decode.py --rounds 5
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

SETTINGS = {  # name -> (tool, dtype, wbits); ours: "compute[/weights]"
    "ours f32": ("ours", "float32", 0), "ours bf16": ("ours", "bfloat16", 0),
    "ours bf16 weights": ("ours", "float32/bfloat16", 0),
    "ours 8-bit": ("ours", "float32", 8), "ours 4-bit": ("ours", "float32", 4),
    "transformers f32": ("hf", "float32", 0),
    "llama.cpp F32": ("llama.cpp", "f32", 0), "llama.cpp Q4_1": ("llama.cpp", "q4_1", 4),
}


def _ids(vocab: int, batch: int, n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(100, vocab, (batch, n))


def run_ours(dtype: str, wbits: int, args: argparse.Namespace) -> dict:
    import jax
    from flax import nnx

    import pyllama_jax as pj
    from pyllama_jax.quant.calibrate import quantize_rtn
    from pyllama_jax.quant.recipe import QuantRecipe

    compute, _, weights = dtype.partition("/")
    m = pj.load("smollm2-135m", dtype=compute, param_dtype=weights or compute)
    if wbits:
        m = pj.Model(quantize_rtn(m.module, QuantRecipe(wbits=wbits, groupsize=128, nearest=True).spec),
                     m.tokenizer)
    weights = sum(x.nbytes for x in jax.tree.leaves(nnx.state(m.module)))
    out = {"weight_bytes": weights}
    for b in args.batches:
        ids = _ids(m.config.vocab_size, b, args.prompt_tokens).tolist()
        m.generate(ids, max_new_tokens=4, ignore_eos=True)  # compile
        g = m.generate(ids, max_new_tokens=args.new_tokens, ignore_eos=True)
        out[f"decode b={b}"] = g.tokens_per_second
    ids = _ids(m.config.vocab_size, 1, args.prefill_tokens)
    m.logits(ids).block_until_ready()  # compile
    start = time.perf_counter()
    m.logits(ids).block_until_ready()
    out[f"prefill {args.prefill_tokens}"] = ids.size / (time.perf_counter() - start)
    return out


def hf_model():
    """HF transformers' float32 SmolLM2 from the embedded GGUF file (also used by experiments/gptq_parity.py)."""
    import torch
    from transformers import AutoModelForCausalLM

    from pyllama_jax.convert.names import embedded_path

    folder, name = os.path.split(embedded_path("smollm2-135m"))
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()


def run_hf(args: argparse.Namespace) -> dict:
    import torch

    model = hf_model()
    out = {"weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    with torch.no_grad():
        for b in args.batches:
            x = torch.tensor(_ids(model.config.vocab_size, b, args.prompt_tokens))
            for n in (4, args.new_tokens):  # the first warms up
                res = model(x, use_cache=True)
                nxt, past = res.logits[:, -1].argmax(-1, keepdim=True), res.past_key_values
                start = time.perf_counter()
                for _ in range(n - 1):
                    res = model(nxt, past_key_values=past, use_cache=True)
                    nxt, past = res.logits[:, -1].argmax(-1, keepdim=True), res.past_key_values
            out[f"decode b={b}"] = b * (args.new_tokens - 1) / (time.perf_counter() - start)
        x = torch.tensor(_ids(model.config.vocab_size, 1, args.prefill_tokens))
        model(x)
        start = time.perf_counter()
        model(x)
        out[f"prefill {args.prefill_tokens}"] = x.numel() / (time.perf_counter() - start)
    return out


def gguf_file(kind: str, folder: str) -> str:
    """The SmolLM2 GGUF file llama.cpp runs: the embedded Q4_1 file, or F32 written by us from it."""
    from pyllama_jax.convert.names import embedded_path

    if kind == "q4_1":
        return embedded_path("smollm2-135m")
    path = os.path.join(folder, "smollm2-135m-f32.gguf")
    if not os.path.isfile(path):
        import pyllama_jax as pj

        pj.load("smollm2-135m").save(path, "gguf", gguf_type="f32")
    return path


def run_llama_cpp(path: str, args: argparse.Namespace) -> dict:
    from llama_cpp import Llama

    threads = os.cpu_count()
    llm = Llama(path, n_ctx=max(args.prefill_tokens, args.prompt_tokens + args.new_tokens) + 8,
                n_batch=args.prefill_tokens, n_threads=threads, n_threads_batch=threads, verbose=False)
    out = {"weight_bytes": os.path.getsize(path)}
    prompt = _ids(llm.n_vocab(), 1, args.prompt_tokens)[0].tolist()
    for n in (4, args.new_tokens):  # the first warms up
        llm.reset()
        llm.eval(prompt)
        start = time.perf_counter()
        for _ in range(n - 1):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    out["decode b=1"] = (args.new_tokens - 1) / (time.perf_counter() - start)
    ids = _ids(llm.n_vocab(), 1, args.prefill_tokens)[0].tolist()
    for _ in range(2):  # the first warms up
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
    out[f"prefill {args.prefill_tokens}"] = len(ids) / (time.perf_counter() - start)
    return out


def worker(args: argparse.Namespace) -> None:
    tool, dtype, wbits = SETTINGS[args.worker]
    if tool == "llama.cpp":
        out = run_llama_cpp(gguf_file(dtype, args.gguf_dir), args)
    else:
        out = run_hf(args) if tool == "hf" else run_ours(dtype, wbits, args)
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--prompt_tokens", type=int, default=11)
    p.add_argument("--prefill_tokens", type=int, default=512)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS),
                   help="default: all (llama.cpp's only where llama-cpp-python is installed)")
    p.add_argument("--gguf_dir", default=os.path.join(tempfile.gettempdir(), "pyllama_decode_bench"),
                   help="where the F32 GGUF file for llama.cpp is written (once)")
    p.add_argument("--bandwidth", type=float, default=27.5, help="memory read bandwidth, GB/s (the limit printed)")
    p.add_argument("--worker", choices=list(SETTINGS), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.settings is None:
        have_llama_cpp = importlib.util.find_spec("llama_cpp") is not None
        args.settings = [s for s, (tool, _, _) in SETTINGS.items() if tool != "llama.cpp" or have_llama_cpp]
    if any(SETTINGS[s][0] == "llama.cpp" for s in args.settings):
        os.makedirs(args.gguf_dir, exist_ok=True)
        gguf_file("f32", args.gguf_dir)  # written before the first round, untimed
    passthrough = [f"--new_tokens={args.new_tokens}", f"--prompt_tokens={args.prompt_tokens}",
                   f"--prefill_tokens={args.prefill_tokens}", "--batches", *map(str, args.batches),
                   f"--gguf_dir={args.gguf_dir}"]
    results: dict[str, list[dict]] = {s: [] for s in args.settings}
    for r in range(args.rounds):
        for s in args.settings:
            done = subprocess.run([sys.executable, __file__, f"--worker={s}", *passthrough], capture_output=True,
                                  text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{s} failed:\n{done.stderr[-3000:]}")
            results[s].append(json.loads(line[7:]))
            print(f"round {r}: {s}: " + ", ".join(f"{k} {v:.1f}" for k, v in results[s][-1].items()
                                                 if k != "weight_bytes"), flush=True)
    import jax

    print(f"\nSmolLM2-135M (GGUF Q4_1 weights, dequantized), {os.cpu_count()} CPU threads, jax {jax.__version__}; "
          f"tok/s, median [min-max] of {args.rounds} alternating rounds, fresh process each; "
          f"{args.new_tokens} new tokens after {args.prompt_tokens}; compile and prefill excluded")
    metrics = list(dict.fromkeys(k for runs in results.values() for k in runs[0] if k != "weight_bytes"))
    ref = results.get("transformers f32")
    print("| setting | weights | " + " | ".join(metrics) + " | b=1 limit at "
          f"{args.bandwidth:g} GB/s |\n|---|---|" + "---|" * (len(metrics) + 1))
    for s, runs in results.items():
        cells = []
        for k in metrics:
            if k not in runs[0]:
                cells.append("-")
                continue
            v = [run[k] for run in runs]
            ratio = f" ({statistics.median(v) / statistics.median(x[k] for x in ref):.2f}x)" if ref else ""
            cells.append(f"{statistics.median(v):.1f} [{min(v):.1f}-{max(v):.1f}]{ratio}")
        wb = runs[0]["weight_bytes"]
        print(f"| {s} | {wb / 2**20:.0f} MiB | " + " | ".join(cells) + f" | {args.bandwidth * 1e9 / wb:.0f} |")


if __name__ == "__main__":
    main()
