"""`pyllama-convert`: convert any checkpoint `pj.load` reads to Hugging Face, Meta, our native format, GPTQ or GGUF.

    python scripts/convert.py --src smollm2-135m --to hf --out /tmp/smollm2-hf
    python scripts/convert.py --src /tmp/smollm2-hf --to meta --out /tmp/smollm2-meta --shards 3
    python scripts/convert.py --src /data/llama-13b --to native --out /data/llama-13b-native --dtype bfloat16
    python scripts/convert.py --src /tmp/smollm2-4bit --to gptq --out /tmp/smollm2-gptq
    python scripts/convert.py --src smollm2-135m --to gguf --gguf-type q8_0 --out /tmp/smollm2-q8_0.gguf

hf/meta/native stream tensors from the source to the output one at a time; gptq (a quantized source)
and gguf load the model first (`pj.load`), then write it (`Model.save`). The output appears only when
it is complete, so a finished conversion is skipped when run again (unless --overwrite).
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

from tqdm import tqdm

from pyllama_jax.convert import hf, meta, native, open_checkpoint
from pyllama_jax.convert.gguf_write import TYPES as GGUF_TYPES
from pyllama_jax.convert.tensorfile import NUMPY_DTYPES
from pyllama_jax.model.params import expected_shapes

WRITERS = {"hf": hf.save, "meta": meta.save, "native": native.save}
EXPORTS = ("gptq", "gguf")  # through a loaded model (`Model.save`)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--src", required=True, help=".gguf file, HF/Meta/native folder, or embedded model name")
    p.add_argument("--to", required=True, choices=sorted(WRITERS) + list(EXPORTS), help="output format")
    p.add_argument("--out", required=True, help="output folder, or .gguf file (created when complete)")
    p.add_argument("--dtype", choices=sorted(NUMPY_DTYPES), help="storage dtype (default: the source's)")
    p.add_argument("--shards", type=int, default=1, help="meta: model-parallel shards, as Meta's code splits them (must divide the head counts)")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="hf: largest safetensors file, in GiB")
    p.add_argument("--gguf-type", choices=GGUF_TYPES, help="gguf: tensor type (default: the weights' dtype; "
                   "q4_1 / q8_0 for 4-bit / 8-bit symmetric groupsize-32 quantized models)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.path.exists(args.out) and not args.overwrite:
        print(f"{args.out} already exists; nothing to do (pass --overwrite to convert again)")
        return 0
    try:
        convert(args)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        sys.exit(f"error: {e}")
    return 0


def convert(args: argparse.Namespace) -> None:
    if args.to in EXPORTS:
        return export(args)
    ckpt = open_checkpoint(args.src)
    tensors = iter(ckpt.tensors)
    first = next(tensors)
    dtype = args.dtype or {v: k for k, v in NUMPY_DTYPES.items()}.get(first[1].dtype, "float32")
    stream = tqdm(itertools.chain([first], tensors), total=len(expected_shapes(ckpt.config)), unit="tensor",
                  desc=f"{args.to} {dtype}")
    options = {"hf": {"max_shard_bytes": int(args.max_shard_gb * 2**30)}, "meta": {"shards": args.shards},
               "native": {}}[args.to]
    WRITERS[args.to](args.out, ckpt.config, stream, ckpt.tokenizer, dtype=dtype, overwrite=args.overwrite,
                     **options)
    print(f"wrote {args.out} ({args.to}, {dtype}) from {ckpt.source}")


def export(args: argparse.Namespace) -> None:
    import pyllama_jax as pj

    model = pj.load(args.src)
    options = {"gguf_type": args.gguf_type} if args.to == "gguf" else {}
    if args.to == "gptq" and model.quant is None:
        raise ValueError(f"{args.src}: a dense model; GPTQ export needs a quantized one (pyllama-quantize "
                         "or pj.quantize first), or write it with --to hf")
    model.save(args.out, format=args.to, overwrite=args.overwrite, **options)
    print(f"wrote {args.out} ({args.to}{' ' + args.gguf_type if args.gguf_type else ''}) from {model.describe()}")


if __name__ == "__main__":
    sys.exit(main())
