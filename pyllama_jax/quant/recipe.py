"""One quantization job from GPTQ's familiar fields: `quantize(model, ...)` for `pj.quantize`."""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from pyllama_jax.data.text import calibration_windows
from pyllama_jax.eval.perplexity import corpus_ids
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
        ids = corpus_ids(model.tokenizer, recipe.calibration, split="train")
        calib = calibration_windows(ids, recipe.nsamples, recipe.seqlen, recipe.seed)
        quantize_gptq(model.module, np.asarray(calib), recipe.spec, recipe.gptq,
                      CalibrationConfig(batch_size, resume_dir))
    from pyllama_jax.api import Model

    return Model(model.module, model.tokenizer, model.source)
