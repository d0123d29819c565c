"""SmolLM2-135M-Instruct with 8-bit GPTQ weights (groupsize 128), calibrated on the "wiki-tail" text.

    python scripts/quantize.py --config=configs/smollm2_135m_8bit.py   # quantize, save, evaluate
    python scripts/run.py --config=configs/smollm2_135m_8bit.py        # load (or make) it, generate
"""
from pyllama_jax.config import smollm2_quant_config


def get_config():
    return smollm2_quant_config(wbits=8)
