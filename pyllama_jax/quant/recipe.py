"""What decides a quantized model: `QuantRecipe` (GPTQ's familiar fields), its record in a checkpoint
and that record in words. `pyllama_jax.quant.driver` applies a recipe to a model."""
from __future__ import annotations

import dataclasses
from typing import Any

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
