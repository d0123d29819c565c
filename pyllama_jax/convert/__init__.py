"""Checkpoint formats: open any supported checkpoint as a config, a tokenizer and a tensor stream.

Formats: llama GGUF (`gguf`), Hugging Face folders (`hf`), Meta's consolidated shards (`meta`) and
our own (`native`). Each yields our tensor names and layout (see `pyllama_jax.model.params`).
"""
from __future__ import annotations

import os
from typing import Any

from pyllama_jax.convert.checkpoint import Checkpoint
from pyllama_jax.convert.names import EMBEDDED, embedded_path


def open_checkpoint(path_or_name: str, **overrides: Any) -> Checkpoint:
    """Open a `.gguf` file, an HF, Meta or native folder, an embedded model name, a Hugging Face Hub
    id (`owner/name`, see `hub.resolve`), or `random:<preset>` (random weights, see `random_weights.py`).

    `overrides` replace `ModelConfig` fields (e.g. `param_dtype`); `dtype`/`param_dtype="auto"`
    mean the dtype the checkpoint stores its weights in (see `stored_dtype`). A tokenizer with more
    tokens than the model's vocabulary is refused here, so every loader and converter checks it.
    """
    from pyllama_jax import tokenizer as tok
    from pyllama_jax.convert import gguf, gptq, hf, hub, meta, native, random_weights

    if path_or_name.startswith(random_weights.PREFIX):
        return random_weights.open_random(path_or_name, **_resolve_auto(overrides, lambda: "float32"))
    if path_or_name in EMBEDDED:
        path = embedded_path(path_or_name)
    elif hub.is_hub_id(path_or_name):
        path = hub.resolve(path_or_name)
    else:
        path = os.path.expanduser(path_or_name)
    if path.endswith(".gguf"):
        g = gguf.GGUFFile(path)
        config = g.config(**_resolve_auto(overrides, lambda: g.stored_dtype()))
        sp = os.path.join(os.path.dirname(path), "tokenizer.model")
        tokenizer = tok.from_tokenizer_model(sp) if os.path.isfile(sp) else tok.from_gguf(g.fields, path)
        ckpt = Checkpoint(config, g.tensors(config), tokenizer, path)
    elif not os.path.exists(path):
        raise FileNotFoundError(f"no model at {path!r}: expected a .gguf file, a Hugging Face folder "
                                f"(config.json), a GPTQ folder (quantize_config.json), a Meta folder (params.json + "
                                f"consolidated.*.pth), a native checkpoint ({native.MANIFEST}), one of {sorted(EMBEDDED)}, "
                                "or random:<preset>")
    else:
        fmt = next((f for f in (native, gptq, hf, meta) if f.detect(path)), None)
        if fmt is None:
            raise ValueError(f"{path}: not a recognised checkpoint (expected a .gguf file, or a folder with "
                             f"config.json, params.json + consolidated.*.pth, or {native.MANIFEST})")
        ckpt = fmt.read(path, **_resolve_auto(overrides, lambda: fmt.stored_dtype(path)))
    if ckpt.tokenizer is not None and ckpt.tokenizer.vocab_size > ckpt.config.vocab_size:
        raise ValueError(f"{ckpt.tokenizer.source}: tokenizer has {ckpt.tokenizer.vocab_size} tokens "
                         f"but the model's vocabulary is {ckpt.config.vocab_size}")
    return ckpt


FLOAT_DTYPES = {"float32", "bfloat16", "float16"}


def _resolve_auto(overrides: dict[str, Any], stored: Any) -> dict[str, Any]:
    """`overrides` with each `"auto"` dtype replaced by `stored()`, the checkpoint's weight dtype."""
    keys = [k for k in ("dtype", "param_dtype") if overrides.get(k) == "auto"]
    if not keys:
        return overrides
    dtype = stored()
    return {**overrides, **dict.fromkeys(keys, dtype if dtype in FLOAT_DTYPES else "float32")}
