"""The default job configuration that every `configs/*.py` file starts from.

Each section belongs to one part of the project; a field's comment says what it does.
"""
from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = "smollm2-135m"  # .gguf file, HF/Meta folder, native checkpoint, or embedded name
    c.dtype = "float32"  # compute dtype: float32 | bfloat16 | float16
    c.param_dtype = "float32"  # weight storage dtype: float32 | bfloat16 | float16
    c.prompts = ["Tell me a short story about a robot who learns to paint."]  # run.py's prompts
    c.chat = True  # wrap prompts in the model's chat template (instruct models)

    c.sampling = ml_collections.ConfigDict()
    c.sampling.max_new_tokens = 64  # tokens generated per prompt at most
    c.sampling.temperature = 0.0  # 0 = greedy
    c.sampling.top_k = 0  # 0 = no top-k cut
    c.sampling.top_p = 1.0  # nucleus sampling mass
    c.sampling.seed = 0  # sampling RNG seed
    c.sampling.stop = ()  # stop strings

    c.quant = ml_collections.ConfigDict()
    c.quant.wbits = 0  # 0 = dense; 2, 3, 4 or 8 = quantized weights
    c.quant.groupsize = 128  # columns per quantization group; -1 = one group per output row
    c.quant.kernel = "xla"  # quantized matmul: "xla" (dequantize then dot) or "pallas"

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1  # data-parallel axis size (-1 = the rest of the devices)
    c.mesh.fsdp = 1  # parameter-sharding axis size (-1 = the rest)
    c.mesh.tensor = 1  # tensor-parallel axis size (-1 = the rest)
    return c


def meta_llama_config(folder: str) -> ml_collections.ConfigDict:
    """A job over Meta's LLaMA files in `folder`, in bfloat16, with plain-text prompts."""
    c = base_config()
    c.model = folder
    c.dtype = "bfloat16"
    c.param_dtype = "bfloat16"
    c.chat = False
    c.prompts = ["I believe the meaning of life is", "Simply put, the theory of relativity states that"]
    return c
