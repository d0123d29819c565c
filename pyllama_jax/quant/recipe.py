"""One quantization job from GPTQ's familiar fields: `quantize(model, ...)` for `pj.quantize`."""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from pyllama_jax.data.text import calibration_windows, load_text
from pyllama_jax.quant.calibrate import CalibrationConfig, quantize_gptq, quantize_rtn
from pyllama_jax.quant.gptq import GPTQConfig
from pyllama_jax.quant.rtn import QuantSpec


@dataclasses.dataclass(frozen=True)
class QuantRecipe:
    """Everything that decides a quantized model (pyllama's `quant_infer` fields)."""

    wbits: int = 4  # 2, 3, 4 or 8
    groupsize: int = 128  # -1 = one scale/zero per output row
    nearest: bool = False  # round-to-nearest instead of GPTQ
    sym: bool = False  # symmetric grid
    mse: bool = False  # grid-search the clipping range
    act_order: bool = False  # GPTQ: inputs by descending Hessian diagonal (static groups)
    percdamp: float = 0.01  # GPTQ damping, fraction of the mean Hessian diagonal
    blocksize: int = 128  # GPTQ lazy-update block
    calibration: str = "c4"  # corpus name or local file (`path@start:end` for a slice)
    nsamples: int = 128  # calibration windows
    seqlen: int = 2048  # tokens per calibration window
    seed: int = 0  # calibration sampling seed

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.wbits, self.groupsize, self.sym, self.mse)

    @property
    def gptq(self) -> GPTQConfig:
        return GPTQConfig(self.percdamp, self.blocksize, self.act_order)

    def describe(self) -> str:
        g = "per-row" if self.groupsize == -1 else f"g{self.groupsize}"
        how = "RTN" if self.nearest else "GPTQ" + (" act-order" if self.act_order else "")
        return f"{how} {self.wbits}-bit {g}" + (" sym" if self.sym else "") + (" mse" if self.mse else "")


def quantize(model: Any, recipe: QuantRecipe = QuantRecipe(), resume_dir: str | None = None,
             batch_size: int = 8, **fields: Any) -> Any:
    """Quantize a loaded model's weights (`pj.load(...)`, changed in place); returns a fresh facade.

    `fields` override `recipe` (e.g. `wbits=3, groupsize=-1, calibration="wiki.train.raw"`).
    GPTQ samples its calibration windows from `recipe.calibration` with the model's tokenizer.
    """
    recipe = dataclasses.replace(recipe, **fields)
    if recipe.nearest:
        quantize_rtn(model.module, recipe.spec)
    else:
        ids = model.tokenizer.encode(load_text(recipe.calibration, split="train"), bos=False)
        calib = calibration_windows(ids, recipe.nsamples, recipe.seqlen, recipe.seed)
        quantize_gptq(model.module, np.asarray(calib), recipe.spec, recipe.gptq,
                      CalibrationConfig(batch_size, resume_dir))
    from pyllama_jax.api import Model

    return Model(model.module, model.tokenizer, model.source, quant={"recipe": recipe_record(recipe)})


def quant_config(**overrides: Any):
    """The `quant` section of a job config (ml_collections): every `QuantRecipe` field (pyllama's GPTQ
    fields, `wbits=0` keeping the model dense) plus how the job runs, saves and evaluates."""
    import ml_collections

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


def recipe_from(q: Any) -> QuantRecipe:
    """A `QuantRecipe` from a config's `quant` section."""
    return QuantRecipe(**{f.name: q[f.name] for f in dataclasses.fields(QuantRecipe)})


GPTQ_ONLY = ("act_order", "percdamp", "blocksize", "calibration", "nsamples", "seqlen", "seed")  # RTN ignores them


def recipe_record(recipe: QuantRecipe) -> dict[str, Any]:
    """The fields that decide a model quantized with `recipe` (RTN: no calibration fields)."""
    record = dataclasses.asdict(recipe)
    return {k: v for k, v in record.items() if not (recipe.nearest and k in GPTQ_ONLY)}


def describe_quant(quant: dict[str, Any]) -> str:
    """A checkpoint's `quant` record in words: `GPTQ 4-bit g128, calibration wiki.train.raw`."""
    r = quant["recipe"]
    text = QuantRecipe(**{k: v for k, v in r.items() if k in QuantRecipe.__dataclass_fields__}).describe()
    if "calibration" in r and not r.get("nearest"):
        text += f", calibration {r['calibration']} ({r['nsamples']} x {r['seqlen']} tokens, seed {r['seed']})"
    return text + (f" ({quant['made_by']})" if quant.get("made_by") else "")


def _differences(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    return [f"{k}: checkpoint {saved[k]!r}, config {wanted[k]!r}" for k in saved if k in wanted and saved[k] != wanted[k]]


def load_or_quantize(c: Any, mesh: Any = None) -> Any:
    """The job's model: the quantized checkpoint at `quant.load`, or at `quant.save` if it exists and
    was made by the config's recipe from the config's model (another one is refused, naming what
    differs); otherwise `c.model` loaded, quantized (when `quant.wbits` > 0) and saved to `quant.save`."""
    import os
    import shutil

    import pyllama_jax as pj
    from pyllama_jax.api import Model
    from pyllama_jax.quant.checkpoint import save_quantized
    from pyllama_jax.model.qlinear import set_kernel

    q = c.quant
    if not (q.wbits or q.load):
        return pj.load(c.model, dtype=c.dtype, param_dtype=c.param_dtype, mesh=mesh, kv_dtype=c.kv_dtype)
    recipe = recipe_from(q)
    made_from = {"model": c.model, "param_dtype": c.param_dtype}
    folder = os.path.expanduser(q.load or q.save)
    if folder and os.path.isdir(folder) and os.listdir(folder):
        model = pj.load(folder, dtype=c.dtype, mesh=mesh, kernel=q.kernel, kv_dtype=c.kv_dtype)
        if model.quant is None:
            raise ValueError(f"{folder}: not a quantized checkpoint (quant.{'load' if q.load else 'save'})")
        wanted = recipe_record(recipe) if q.wbits else {}
        differ = _differences(model.quant["recipe"], wanted)
        if not q.load:
            differ += _differences(model.quant.get("made_from", {}), made_from)
        if differ:
            raise ValueError(f"{folder} holds a checkpoint made by another recipe than the config's ("
                             + "; ".join(differ) + "); set quant.save to another folder, delete this one, "
                             "or match the config to it")
        return model
    if q.load:
        raise FileNotFoundError(f"quant.load={q.load!r}: no quantized checkpoint there")
    model = pj.load(c.model, dtype=c.dtype, param_dtype=c.param_dtype, kv_dtype=c.kv_dtype)
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
        from pyllama_jax.model import place

        model = Model(place.shard(model.module, mesh), model.tokenizer, model.source, mesh, model.quant)
    return model
