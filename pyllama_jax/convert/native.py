"""Our own checkpoint: a folder with `pyllama.json`, `model.safetensors` and the tokenizer files.

`pyllama.json` holds the `ModelConfig` and tokenizer facts HF files do not keep (all end-of-sequence
ids); the safetensors file holds our tensor names in our layout, so reloading is a plain read with
no renaming, transposing or permuting. A quantized model (version 2) adds the manifest's `quant`:
the recipe that made it, the model it was made from, and the packed `layout` of each quantized
linear (`bits`, `groupsize`, `scales_dtype`), whose `qweight`/`scales`/`qzeros`/`g_idx` tensors
replace its `kernel`.
"""
from __future__ import annotations

import os
from typing import Any, Iterable

import numpy as np

from pyllama_jax import tokenizer as tok
from pyllama_jax.convert import hf
from pyllama_jax.convert.checkpoint import Checkpoint
from pyllama_jax.convert.tensorfile import (NUMPY_DTYPES, SafetensorsWriter, Spec, atomic_folder, read_json,
                                            read_safetensors, safetensors_header, write_json)
from pyllama_jax.model.config import ModelConfig
from pyllama_jax.model.params import expected_shapes

MANIFEST = "pyllama.json"
FORMAT, VERSION = "pyllama-native", 2  # version 1: dense only, no `quant`
WEIGHTS = "model.safetensors"


def detect(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MANIFEST))


def stored_dtype(folder: str) -> str:
    """The `param_dtype` the checkpoint was saved with."""
    return read_json(os.path.join(folder, MANIFEST)).get("config", {}).get("param_dtype", "float32")


def read(folder: str, **overrides: Any) -> Checkpoint:
    manifest_path = os.path.join(folder, MANIFEST)
    manifest = read_json(manifest_path)
    if manifest.get("format") != FORMAT or manifest.get("version") not in (1, VERSION):
        raise ValueError(f"{manifest_path}: format/version is {manifest.get('format')!r}/"
                         f"{manifest.get('version')!r}, expected {FORMAT!r}/1 or {VERSION}")
    try:
        config = ModelConfig.from_dict({**manifest["config"], **overrides})
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{manifest_path}: field 'config' is not a valid ModelConfig ({e})") from e
    weights = os.path.join(folder, WEIGHTS)
    safetensors_header(weights)
    tokenizer = hf.read_tokenizer(folder)
    if tokenizer is not None and manifest.get("eos_ids"):
        tokenizer.eos_ids = frozenset(manifest["eos_ids"])
    quant = manifest.get("quant")
    if quant is not None and not (isinstance(quant, dict) and isinstance(quant.get("layout"), dict)):
        raise ValueError(f"{manifest_path}: field 'quant' must hold the recipe and a 'layout' of the packed linears")
    return Checkpoint(config, read_safetensors(weights), tokenizer, folder, quant)


def save(out: str, config: ModelConfig, tensors: Iterable[tuple[str, np.ndarray]],
         tokenizer: tok.Tokenizer | None = None, *, dtype: str | None = None, overwrite: bool = False,
         specs: dict[str, Spec] | None = None, quant: dict[str, Any] | None = None) -> None:
    """Write our named tensors as a native checkpoint, stored in `dtype` (default `config.param_dtype`).

    A quantized model passes the `specs` (shape, dtype) of its tensors and its `quant` manifest.
    """
    config = config.replace(param_dtype=dtype or config.param_dtype)
    if specs is None:
        specs = {n: (s, NUMPY_DTYPES[config.param_dtype]) for n, s in expected_shapes(config).items()}
    with atomic_folder(out, overwrite) as tmp:
        with SafetensorsWriter(os.path.join(tmp, WEIGHTS), specs, {"format": FORMAT}) as writer:
            for name, w in tensors:
                writer.write(name, w)
        write_json(os.path.join(tmp, MANIFEST), {
            "format": FORMAT, "version": VERSION, "config": config.to_dict(),
            "eos_ids": sorted(tokenizer.eos_ids) if tokenizer else None,
            **({"quant": quant} if quant is not None else {})})
        if tokenizer is not None:
            hf.write_tokenizer(tokenizer, tmp)
