"""Full fine-tuning of SmolLM2-135M-Instruct on Alpaca's seed tasks: every weight trains, float32
master weights with bfloat16 compute."""
from pyllama_jax.config import alpaca_config


def get_config():
    c = alpaca_config()
    c.dtype = "bfloat16"
    c.param_dtype = "float32"
    c.train.workdir = "runs/alpaca_full"
    c.train.lora = False
    c.train.lr = 2e-5
    c.train.weight_decay = 0.01
    return c
