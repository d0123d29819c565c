"""Apply a `QuantRecipe` to a model: module in, module out (its block linears replaced in place)."""
from __future__ import annotations

import numpy as np

from pyllama_jax.data.text import calibration_windows, load_text
from pyllama_jax.model.llama import Llama
from pyllama_jax.quant.awq import AWQConfig
from pyllama_jax.quant.calibrate import (CalibrationConfig, Rounding, gptq_rounding, quantize_calibrated, quantize_rtn,
                                         rtn_rounding, signround_rounding)
from pyllama_jax.quant.recipe import QuantRecipe
from pyllama_jax.quant.signround import SignRoundConfig
from pyllama_jax.tokenizer import Tokenizer


def calibration_ids(tokenizer: Tokenizer, recipe: QuantRecipe) -> np.ndarray:
    """The recipe's calibration windows `[nsamples, seqlen]`: `recipe.calibration` tokenized, then sampled."""
    ids = tokenizer.encode(load_text(recipe.calibration, split="train"), bos=False)
    return np.asarray(calibration_windows(ids, recipe.nsamples, recipe.seqlen, recipe.seed))


def rounding(recipe: QuantRecipe) -> Rounding:
    """How the calibrated driver rounds each linear for `recipe`: SignRound, RTN or GPTQ."""
    if recipe.signround_steps:
        return signround_rounding(recipe.spec, SignRoundConfig(recipe.signround_steps))
    return rtn_rounding(recipe.spec) if recipe.nearest else gptq_rounding(recipe.spec, recipe.gptq)


def quantize(module: Llama, recipe: QuantRecipe = QuantRecipe(), *, tokenizer: Tokenizer | None = None,
             calibration: np.ndarray | None = None, resume_dir: str | None = None, batch_size: int = 8) -> Llama:
    """Quantize `module`'s block linears by `recipe` (plain RTN; or block by block on `calibration[n, seqlen]`
    token ids, by default made from `recipe.calibration` with `tokenizer`); returns `module`, changed in place."""
    if not recipe.calibrated:
        return quantize_rtn(module, recipe.spec)
    if calibration is None:
        if tokenizer is None:
            raise ValueError(f"{recipe.describe()} needs calibration token ids (calibration=) or a tokenizer to make "
                             f"them from recipe.calibration={recipe.calibration!r}")
        calibration = calibration_ids(tokenizer, recipe)
    awq = AWQConfig(clip=recipe.awq_clip) if recipe.awq else None
    return quantize_calibrated(module, calibration, recipe.spec, rounding(recipe),
                               CalibrationConfig(batch_size, resume_dir), awq)
