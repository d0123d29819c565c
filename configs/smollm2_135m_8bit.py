"""SmolLM2-135M-Instruct with 8-bit GPTQ weights (groupsize 128), calibrated on the "wiki-tail" text.

    python scripts/quantize.py --config=configs/smollm2_135m_8bit.py   # quantize, save, evaluate
    python scripts/run.py --config=configs/smollm2_135m_8bit.py        # load (or make) it, generate

Calibration and evaluation follow ../shared/reference/gptq-smollm2.md: 128 windows of 512 tokens
from WikiText-2 test after character 640,000; perplexity on the file's first windows.
"""
import os

from pyllama_jax.config import base_config
from pyllama_jax.data.text import data_dir
from pyllama_jax.quant.recipe import quant_config

WIKI = os.path.join(data_dir(), "wikitext-2-raw", "wiki.test.raw")


def get_config():
    c = base_config()
    c.quant = quant_config(wbits=8, groupsize=128, calibration=WIKI + "@640000:", nsamples=128, seqlen=512,
                           save="artifacts/smollm2_135m_8bit", eval=(WIKI,), eval_windows=128)
    return c
