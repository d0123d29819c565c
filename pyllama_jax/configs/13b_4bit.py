"""LLaMA-13B with 4-bit weights (groupsize 128), tensor-parallel over a few devices.

    python scripts/run.py --config=configs/13b_4bit.py --config.mesh.tensor=2

13B has 40 heads and a SwiGLU width of 13824 (108 groups of 128 in mlp.down), so mesh.tensor may
be 1, 2 or 4 (8 would split down's groups unevenly and is refused with the layer named).
Point `model` at Meta's 13B folder (or --config.model=...); see configs/13b.py.
"""
from pyllama_jax.config import meta_llama_config


def get_config():
    c = meta_llama_config("~/llama/13B")
    c.quant.wbits = 4
    c.quant.groupsize = 128
    c.mesh.tensor = 1  # one device by default; --config.mesh.tensor=2 or 4 to split the model
    return c
