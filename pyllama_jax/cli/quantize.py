"""`pyllama-quantize`: quantize a model with GPTQ (or RTN), save it, and report perplexity and
pyllama's benchmark.

A saved checkpoint (`quant.save`/`quant.load`) is loaded instead of quantizing again.

    python scripts/quantize.py --config=configs/smollm2_135m_4bit.py
    python scripts/quantize.py --config=configs/smollm2_135m_4bit.py --config.quant.nearest=True \\
        --config.quant.save=artifacts/smollm2_rtn4
"""
from __future__ import annotations

import sys

import ml_collections

from pyllama_jax.cli import job
from pyllama_jax.eval.perplexity import report
from pyllama_jax.jobs.quantize import load_or_quantize


def quantize(c: ml_collections.ConfigDict) -> None:
    """Quantize (or load) the configured model and report on `c.quant.eval`."""
    if not (c.quant.wbits or c.quant.load):
        sys.exit("error: nothing to quantize: set --config.quant.wbits to 2, 3, 4 or 8 (or quant.load)")
    report(load_or_quantize(c), c.quant)


def main() -> None:
    job.run(quantize, "smollm2_135m_4bit.py")


if __name__ == "__main__":
    main()
