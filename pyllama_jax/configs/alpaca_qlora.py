"""QLoRA: LoRA adapters on a frozen 4-bit base (packed int32 weights, group size 128).

The base is quantized at start-up (round-to-nearest here; GPTQ with `--config.quant.nearest=False`
and a calibration text), or loaded already quantized from a quantized checkpoint. With a 7B base
(`--config.model=~/llama/7B`) only the adapters and their optimizer state add to the packed
weights, so it trains on one small GPU.
"""
from pyllama_jax.config import alpaca_config


def get_config():
    c = alpaca_config()
    c.quant.wbits = 4
    c.quant.groupsize = 128
    c.quant.nearest = True
    c.train.workdir = "runs/alpaca_qlora"
    c.train.lr = 2e-4
    return c
