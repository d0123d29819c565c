"""LoRA fine-tuning of SmolLM2-135M-Instruct on Stanford Alpaca's 175 seed tasks (CPU-sized).

Point `data.path` at Alpaca's `alpaca_data.json` (or a `datasets` name such as
`tatsu-lab/alpaca`, with `datasets` installed) and `model` at a 7B folder for the full recipe.
"""
from pyllama_jax.config import alpaca_config


def get_config():
    return alpaca_config()
