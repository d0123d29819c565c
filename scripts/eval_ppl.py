"""Perplexity (GPTQ protocol) of the configured model, dense or quantized, and pyllama's benchmark.

The corpora are `quant.eval` (wikitext2 | ptb | c4 | a local file[@start:end]); a quantized config
loads its saved checkpoint, or quantizes and saves it first (as scripts/quantize.py does).

    python scripts/eval_ppl.py --config=configs/smollm2_135m_4bit.py --config.quant.eval_windows=16
    python scripts/eval_ppl.py --config=configs/smollm2_135m.py --config.quant.wbits=0 \\
        --config.quant.eval=wikitext2 --config.quant.benchmark=128 --config.quant.check=True
"""
from __future__ import annotations

import os
import sys

from absl import app
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pyllama_jax.eval.perplexity import report  # noqa: E402
from pyllama_jax.quant.recipe import load_or_quantize  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/smollm2_135m_4bit.py", "job configuration file")


def main(argv: list[str]) -> None:
    del argv
    c = _CONFIG.value
    if not c.quant.eval:
        sys.exit("error: no corpus to evaluate: set --config.quant.eval=wikitext2 (or ptb, c4, a local file)")
    report(load_or_quantize(c), c.quant)


if __name__ == "__main__":
    app.run(main)
