"""Apply a `QuantRecipe` to a model: module in, module out (its block linears replaced in place)."""
from __future__ import annotations

import numpy as np

from pyllama_jax.data.text import calibration_windows, load_text
from pyllama_jax.model.llama import Llama
from pyllama_jax.quant.calibrate import CalibrationConfig, quantize_gptq, quantize_rtn
from pyllama_jax.quant.recipe import QuantRecipe
from pyllama_jax.tokenizer import Tokenizer


def calibration_ids(tokenizer: Tokenizer, recipe: QuantRecipe) -> np.ndarray:
    """The recipe's calibration windows `[nsamples, seqlen]`: `recipe.calibration` tokenized, then sampled."""
    ids = tokenizer.encode(load_text(recipe.calibration, split="train"), bos=False)
    return np.asarray(calibration_windows(ids, recipe.nsamples, recipe.seqlen, recipe.seed))


def quantize(module: Llama, recipe: QuantRecipe = QuantRecipe(), *, tokenizer: Tokenizer | None = None,
             calibration: np.ndarray | None = None, resume_dir: str | None = None, batch_size: int = 8) -> Llama:
    """Quantize `module`'s block linears by `recipe` (RTN, or GPTQ on `calibration[n, seqlen]` token ids,
    by default made from `recipe.calibration` with `tokenizer`); returns `module`, changed in place."""
    if recipe.nearest:
        return quantize_rtn(module, recipe.spec)
    if calibration is None:
        if tokenizer is None:
            raise ValueError("GPTQ needs calibration token ids (calibration=) or a tokenizer to make them from "
                             f"recipe.calibration={recipe.calibration!r}")
        calibration = calibration_ids(tokenizer, recipe)
    return quantize_gptq(module, calibration, recipe.spec, recipe.gptq, CalibrationConfig(batch_size, resume_dir))
