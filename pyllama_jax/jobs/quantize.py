"""The quantization job of a config: its `quant` section, and the model it asks for (loaded, or
quantized now and saved), above the facade (`pj.load_from_config`)."""
from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any

import ml_collections
from jax.sharding import Mesh

from pyllama_jax.api import Model, load, quantize
from pyllama_jax.convert.save import save_quantized
from pyllama_jax.model import place
from pyllama_jax.model.qlinear import set_kernel
from pyllama_jax.quant.recipe import QuantRecipe, recipe_from, recipe_record, with_method_defaults


def quant_config(**overrides: Any) -> ml_collections.ConfigDict:
    """The `quant` section of a job config (ml_collections): every `QuantRecipe` field (pyllama's GPTQ
    fields, `wbits=0` keeping the model dense) plus how the job runs, saves and evaluates."""
    c = ml_collections.ConfigDict(dataclasses.asdict(QuantRecipe()))
    c.batch_size = 8  # windows per forward call (calibration and evaluation)
    c.kernel = "xla"  # quantized matmul: xla | pallas
    c.save = ""  # quantized checkpoint folder: written after quantizing, loaded if it exists
    c.load = ""  # quantized checkpoint folder (ours or AutoGPTQ) to load instead of quantizing
    c.eval = ()  # corpora to report perplexity on after quantizing
    c.eval_windows = 0  # evaluate at most this many windows per corpus; 0 = all
    c.benchmark = 0  # pyllama's --benchmark N: time per token over N tokens of the first eval corpus
    c.check = False  # with benchmark: also report the perplexity of those N tokens
    c.update(overrides)
    return c


def _differences(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    return [f"{k}: checkpoint {saved[k]!r}, config {wanted[k]!r}" for k in saved if k in wanted and saved[k] != wanted[k]]


def load_or_quantize(c: Any, mesh: Mesh | None = None) -> Model:
    """The job's model: the quantized checkpoint at `quant.load`, or at `quant.save` if it exists and
    was made by the config's recipe from the config's model (another one is refused, naming what
    differs); otherwise `c.model` loaded, quantized (when `quant.wbits` > 0) and saved to `quant.save`."""
    q = c.quant
    if not (q.wbits or q.load):
        return load(c.model, dtype=c.dtype, param_dtype=c.param_dtype, mesh=mesh, kv_dtype=c.kv_dtype)
    recipe = recipe_from(q)
    made_from = {"model": c.model, "param_dtype": c.param_dtype}
    folder = os.path.expanduser(q.load or q.save)
    if folder and os.path.isdir(folder) and os.listdir(folder):
        model = load(folder, dtype=c.dtype, mesh=mesh, kernel=q.kernel, kv_dtype=c.kv_dtype)
        if model.quant is None:
            raise ValueError(f"{folder}: not a quantized checkpoint (quant.{'load' if q.load else 'save'})")
        wanted = with_method_defaults(recipe_record(recipe)) if q.wbits else {}
        differ = _differences(with_method_defaults(model.quant["recipe"]), wanted)
        if not q.load:
            differ += _differences(model.quant.get("made_from", {}), made_from)
        if differ:
            raise ValueError(f"{folder} holds a checkpoint made by another recipe than the config's ("
                             + "; ".join(differ) + "); set quant.save to another folder, delete this one, "
                             "or match the config to it")
        return model
    if q.load:
        raise FileNotFoundError(f"quant.load={q.load!r}: no quantized checkpoint there")
    model = load(c.model, dtype=c.dtype, param_dtype=c.param_dtype, kv_dtype=c.kv_dtype)
    resume = folder.rstrip("/") + ".resume" if folder else None
    model = quantize(model, recipe, resume_dir=resume, batch_size=q.batch_size)
    set_kernel(model.module, q.kernel)
    model.quant = {"recipe": recipe_record(recipe), "made_from": made_from}
    if folder:
        size = save_quantized(model.module, folder, model.quant, model.tokenizer)
        shutil.rmtree(resume, ignore_errors=True)
        print(f"saved {folder}: {size / 2 ** 20:.1f} MiB")
        model.source = folder
    if mesh is not None:
        model = Model(place.shard(model.module, mesh), model.tokenizer, model.source, mesh, model.quant)
    return model


load_from_config = load_or_quantize  # `pj.load_from_config`
