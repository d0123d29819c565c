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
    awq: bool = False  # AWQ's per-block scale search and folding before rounding (RTN: AWQ proper; GPTQ: AWQ+GPTQ)
    awq_clip: bool = False  # with awq: AWQ's auto-clip of each scaled kernel's groups
    signround_steps: int = 0  # 0 = off; > 0: SignRound's learned rounding (that many steps) replaces RTN's

    def __post_init__(self) -> None:
        steps = self.signround_steps
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise ValueError(f"signround_steps={steps!r}: expected 0 (off) or a positive number of steps")
        if steps and not self.nearest:
            raise ValueError(f"signround_steps={steps} replaces the rounding: set nearest=True "
                             "(SignRound instead of round-to-nearest; it does not combine with GPTQ)")
        if steps and self.mse:
            raise ValueError(f"mse=True with signround_steps={steps}: SignRound learns its own clipping; "
                             "set mse=False")
        if self.awq_clip and not self.awq:
            raise ValueError("awq_clip=True clips AWQ's scaled kernels: set awq=True as well")

    @property
    def calibrated(self) -> bool:
        """Whether the recipe needs calibration inputs (GPTQ, AWQ or SignRound)."""
        return not self.nearest or self.awq or self.signround_steps > 0

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.wbits, self.groupsize, self.sym, self.mse)

    @property
    def gptq(self) -> GPTQConfig:
        return GPTQConfig(self.percdamp, self.blocksize, self.act_order)

    @property
    def method(self) -> str:
        """The rounding and what it adds, in words: `GPTQ act-order`, `RTN+AWQ+clip`, `SignRound-200`."""
        how = f"SignRound-{self.signround_steps}" if self.signround_steps else "RTN" if self.nearest else "GPTQ"
        how += ("+AWQ" if self.awq else "") + ("+clip" if self.awq_clip else "")
        return how + (" act-order" if self.act_order and not self.nearest else "")

    def describe(self) -> str:
        g = "per-row" if self.groupsize == -1 else f"g{self.groupsize}"
        return f"{self.method} {self.wbits}-bit {g}" + (" sym" if self.sym else "") + (" mse" if self.mse else "")


def recipe_from(q: Any) -> QuantRecipe:
    """A `QuantRecipe` from a config's `quant` section."""
    return QuantRecipe(**{f.name: q[f.name] for f in dataclasses.fields(QuantRecipe)})


GPTQ_ONLY = ("act_order", "percdamp", "blocksize")  # RTN and SignRound ignore them
CALIBRATION_FIELDS = ("calibration", "nsamples", "seqlen", "seed")  # plain RTN ignores them
# Methods added after checkpoints and ablation cells were first recorded: kept in a record only when
# on, so records (and cell keys) of recipes without them are what they were.
METHOD_DEFAULTS = {"awq": False, "awq_clip": False, "signround_steps": 0}


def recipe_fields(recipe: QuantRecipe) -> dict[str, Any]:
    """`recipe`'s fields, less those of `METHOD_DEFAULTS` left at their defaults."""
    return {k: v for k, v in dataclasses.asdict(recipe).items() if k not in METHOD_DEFAULTS or v != METHOD_DEFAULTS[k]}


def with_method_defaults(record: dict[str, Any]) -> dict[str, Any]:
    """A record with the `METHOD_DEFAULTS` it leaves out filled in (to compare records field by field)."""
    return {**METHOD_DEFAULTS, **record}


def recipe_record(recipe: QuantRecipe) -> dict[str, Any]:
    """The fields that decide a model quantized with `recipe` (RTN: no GPTQ fields; plain RTN: no
    calibration fields either)."""
    drop = (GPTQ_ONLY if recipe.nearest else ()) + (() if recipe.calibrated else CALIBRATION_FIELDS)
    return {k: v for k, v in recipe_fields(recipe).items() if k not in drop}


def describe_quant(quant: dict[str, Any]) -> str:
    """A checkpoint's `quant` record in words: `GPTQ 4-bit g128, calibration wiki.train.raw`."""
    r = quant["recipe"]
    text = QuantRecipe(**{k: v for k, v in r.items() if k in QuantRecipe.__dataclass_fields__}).describe()
    if "calibration" in r:
        text += f", calibration {r['calibration']} ({r['nsamples']} x {r['seqlen']} tokens, seed {r['seed']})"
    return text + (f" ({quant['made_by']})" if quant.get("made_by") else "")
