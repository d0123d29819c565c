"""LLaMA-7B with 4-bit GPTQ weights (groupsize 128), calibrated on C4 as GPTQ's paper does.

    python scripts/quantize.py --config=configs/7b_4bit.py --config.model=/data/llama/7B
    python scripts/run.py --config=configs/7b_4bit.py   # loads artifacts/llama7b_4bit, or makes it first

C4 and WikiText-2 are fetched with `datasets` (pip install datasets); offline, point
--config.quant.calibration / --config.quant.eval at local text files.
"""
from pyllama_jax.config import meta_llama_config
from pyllama_jax.jobs.quantize import quant_config


def get_config():
    c = meta_llama_config("~/llama/7B")
    c.quant = quant_config(wbits=4, groupsize=128, calibration="c4", nsamples=128, seqlen=2048,
                           save="artifacts/llama7b_4bit", eval=("wikitext2",))
    return c
