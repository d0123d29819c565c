"""`pyllama-eval-ppl`: perplexity (GPTQ protocol) of the configured model, dense or quantized, and pyllama's benchmark.

The corpora are `quant.eval` (wikitext2 | ptb | c4 | a local file[@start:end]); a quantized config
loads its saved checkpoint, or quantizes and saves it first (as scripts/quantize.py does).

    python scripts/eval_ppl.py --config=configs/smollm2_135m_4bit.py --config.quant.eval_windows=16
    python scripts/eval_ppl.py --config=configs/smollm2_135m.py --config.quant.wbits=0 \\
        --config.quant.eval=wikitext2 --config.quant.benchmark=128 --config.quant.check=True
"""
from __future__ import annotations

import sys

import ml_collections

from pyllama_jax.cli import job
from pyllama_jax.eval.perplexity import report
from pyllama_jax.jobs.quantize import load_or_quantize


def evaluate(c: ml_collections.ConfigDict) -> None:
    """Perplexity of the configured (dense or quantized) model on `c.quant.eval`."""
    if not c.quant.eval:
        sys.exit("error: no corpus to evaluate: set --config.quant.eval=wikitext2 (or ptb, c4, a local file)")
    report(load_or_quantize(c), c.quant)


def main() -> None:
    job.run(evaluate, "smollm2_135m_4bit.py")


if __name__ == "__main__":
    main()
