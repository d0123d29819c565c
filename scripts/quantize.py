"""Quantize a model with GPTQ (or RTN), save it, and report perplexity and pyllama's benchmark.

A saved checkpoint (`quant.save`/`quant.load`) is loaded instead of quantizing again.

    python scripts/quantize.py --config=configs/smollm2_135m_4bit.py
    python scripts/quantize.py --config=configs/smollm2_135m_4bit.py --config.quant.nearest=True \\
        --config.quant.save=artifacts/smollm2_rtn4
"""
from __future__ import annotations

import os
import sys

from absl import app
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pyllama_jax.quant.recipe import load_or_quantize  # noqa: E402
from pyllama_jax.eval.perplexity import report  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/smollm2_135m_4bit.py", "job configuration file")


def main(argv: list[str]) -> None:
    del argv
    c = _CONFIG.value
    if not (c.quant.wbits or c.quant.load):
        sys.exit("error: nothing to quantize: set --config.quant.wbits to 2, 3, 4 or 8 (or quant.load)")
    report(load_or_quantize(c), c.quant)


if __name__ == "__main__":
    app.run(main)
